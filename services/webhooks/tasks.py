"""Celery entry point of the webhook worker: signed deliveries of edit jobs' events.

    celery --app services.webhooks.tasks worker --queues webhooks \
        --pool threads --concurrency 8

Network I/O only (no GPU, no torch), so one process with threads serves many slow
receivers at once. The API and the GPU workers publish one task per delivery
(queues.enqueue_webhook); the task reads the job when it runs, renders it as the API does
(services/api/job_view.py), signs it with the owner's API key's webhook secret and sends
it (services/common/webhook_delivery.py). A failed attempt is retried by Celery itself,
with exponential backoff and full jitter, for about `webhook_retry_for_s`; every attempt is
logged beside the job (DeliveryLog), the last one marked final.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from celery import signals
from pydantic_core import to_jsonable_python

from services.common.api_keys import KeyNotFound, KeyStore
from services.common.celery_app import create_celery_app
from services.common.jobs import EditJob, JobNotFound, JobStore
from services.common.logging import bind_request_id, configure_celery_logging
from services.common.queues import WEBHOOK_TASK
from services.common.settings import Settings, get_settings
from services.common.webhook_delivery import (
    DeliveryAttempt,
    DeliveryLog,
    DeliveryResult,
    deliver,
)
from services.common.webhooks import WebhookEvent, event_type

log = logging.getLogger("instructedit.webhooks")

settings = get_settings()
app = create_celery_app(settings)


@signals.setup_logging.connect
def _configure_logging(**kwargs) -> None:
    configure_celery_logging(service="webhooks", **kwargs)
    # httpx logs every request's URL at INFO: the pinned address, and the query string
    # (where receivers put tokens). The task logs each attempt itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)


# Celery's exponential backoff: attempt n+1 waits a random time of up to
# RETRY_BACKOFF_S * 2**(n-1) seconds, at most RETRY_BACKOFF_MAX_S.
RETRY_BACKOFF_S = 1
RETRY_BACKOFF_MAX_S = 600
# Receivers that answer this say "never again" (Standard Webhooks): no retry.
GONE = 410


def max_retries_for(
    retry_for_s: float, backoff_s: int = RETRY_BACKOFF_S, backoff_max_s: int = RETRY_BACKOFF_MAX_S
) -> int:
    """The most retries whose longest waits (before jitter) add up to at most `retry_for_s`:
    with full jitter the retries of one delivery end within that time. 3600 s: 14 retries
    (1, 2, 4, ... 512 s, then 600 s each), 15 attempts."""
    retries, total = 0, 0.0
    while True:
        wait = min(backoff_max_s, backoff_s * 2**retries)
        if total + wait > retry_for_s:
            return retries
        total += wait
        retries += 1


class RetryableDelivery(Exception):
    """This attempt failed, and another may succeed: Celery retries the task."""


@dataclass
class Dependencies:
    jobs: JobStore
    keys: KeyStore
    log: DeliveryLog
    allowed_hosts: tuple[str, ...]
    timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Dependencies:
        client = redis.Redis.from_url(settings.redis_url)
        return cls(
            jobs=JobStore(client, settings.job_ttl_s),
            keys=KeyStore(client),
            log=DeliveryLog(client, settings.job_ttl_s),
            allowed_hosts=tuple(settings.webhook_allowed_hosts),
            timeout_s=settings.webhook_timeout_s,
        )


# Built on first use; tests set them.
_deps: Dependencies | None = None
_render: Callable[[EditJob], dict[str, Any]] | None = None


def dependencies() -> Dependencies:
    global _deps
    if _deps is None:
        _deps = Dependencies.from_settings(settings)
    return _deps


def renderer() -> Callable[[EditJob], dict[str, Any]]:
    """The job as the API renders it (imported on first use: the API's modules)."""
    global _render
    if _render is None:
        from services.api.job_view import render_job_for_webhook

        _render = render_job_for_webhook
    return _render


def build_payload(job: EditJob, event: WebhookEvent, now: datetime | None = None) -> str:
    """The delivery's body: `{"type", "timestamp", "data"}` (Standard Webhooks), compact."""
    body = {
        "type": event_type(event),
        "timestamp": (now or datetime.now(UTC)).isoformat(),
        "data": renderer()(job),
    }
    return json.dumps(body, separators=(",", ":"), default=to_jsonable_python)


MAX_RETRIES = max_retries_for(settings.webhook_retry_for_s)


@app.task(
    name=WEBHOOK_TASK,
    bind=True,
    acks_late=True,
    ignore_result=True,
    autoretry_for=(RetryableDelivery,),
    retry_backoff=RETRY_BACKOFF_S,
    retry_backoff_max=RETRY_BACKOFF_MAX_S,
    retry_jitter=True,
    max_retries=MAX_RETRIES,
)
def deliver_webhook(self, job_id: str, event: str, webhook_id: str) -> None:
    """One attempt of delivery `webhook_id` of job `job_id`'s `event`."""
    attempt = self.request.retries + 1
    deps = dependencies()
    try:
        job = deps.jobs.get(job_id)
    except JobNotFound:
        log.info("webhook %s not sent: job %s was deleted", webhook_id, job_id)
        return
    with bind_request_id(job.request_id, job_id):
        run_attempt(deps, job, WebhookEvent(event), webhook_id, attempt, self.max_retries)


def run_attempt(
    deps: Dependencies,
    job: EditJob,
    event: WebhookEvent,
    webhook_id: str,
    attempt: int,
    max_retries: int | None,
) -> DeliveryResult | None:
    """Send, log the attempt; raise RetryableDelivery when another attempt should follow.
    None: nothing to send (the job asks for no such event, or its owner is gone)."""
    spec = job.webhook
    if spec is None or not spec.wants(event):
        return None
    try:
        secret = deps.keys.webhook_secret(job.owner)
    except KeyNotFound:
        log.warning("webhook %s not sent: the job's API key %s is gone", webhook_id, job.owner)
        return None
    started = datetime.now(UTC)
    result = deliver(
        spec.url,
        secret,
        webhook_id,
        build_payload(job, event, started),
        allowed_hosts=deps.allowed_hosts,
        timeout_s=deps.timeout_s,
    )
    last_allowed = max_retries is not None and attempt > max_retries
    final = result.ok or result.refused or result.status_code == GONE or last_allowed
    deps.log.record(
        job.id,
        DeliveryAttempt(
            webhook_id=webhook_id,
            event=event,
            attempt=attempt,
            at=started,
            status_code=result.status_code,
            error=result.error,
            duration_ms=result.duration_ms,
            final=final,
        ),
    )
    fields = {
        "webhook_id": webhook_id,
        "event": event.value,
        "attempt": attempt,
        "status_code": result.status_code,
        "duration_ms": result.duration_ms,
    }
    if result.ok:
        log.info("webhook delivered", extra=fields)
        return result
    if final:
        log.warning("webhook given up: %s", result.error, extra=fields)
        return result
    log.info("webhook attempt failed, will retry: %s", result.error, extra=fields)
    raise RetryableDelivery(result.error)
