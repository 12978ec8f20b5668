"""Queueing a job's webhook deliveries where its events happen.

Whoever makes a change sends its event: the worker that starts a job (`start`), moves
its progress (`progress`, at most one a second) or ends it (`completed`), the API that
cancels a queued or running job, the reaper that fails a job. Only the job's id and the
event travel: the `webhooks` worker renders the job as it then stands and signs it
(services/webhooks/tasks.py). Queueing is one Redis command, off the GPU's path; a
failure to queue is logged, never fails the job.

The delivery's `webhook-id` is derived from the event, so that the same event sent twice
(a redelivered task) has one id, which receivers use to drop duplicates.
"""

from __future__ import annotations

import logging
import threading
import time

from services.common.jobs import EditJob
from services.common.queues import enqueue_webhook
from services.common.webhooks import WebhookEvent

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0


def webhook_id(job: EditJob, event: WebhookEvent, detail: str) -> str:
    return f"msg_{job.id}_{event.value}_{detail}"


class WebhookNotifier:
    def __init__(self, celery) -> None:
        self.celery = celery
        self._last_progress: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, job: EditJob, event: WebhookEvent, detail: str = "") -> None:
        if job.webhook is None or not job.webhook.wants(event):
            return
        if event == WebhookEvent.progress and not self._progress_due(job.id):
            return
        detail = detail or (job.status.value if event == WebhookEvent.completed else "")
        try:
            enqueue_webhook(self.celery, job.id, event.value, webhook_id(job, event, detail))
        except Exception as exc:
            log.warning("could not queue the %s webhook of job %s: %r", event, job.id, exc)

    def _progress_due(self, job_id: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last_progress.get(job_id, float("-inf")) < PROGRESS_EVERY_S:
                return False
            self._last_progress[job_id] = now
            if len(self._last_progress) > 10_000:  # jobs long gone
                self._last_progress.clear()
            return True
