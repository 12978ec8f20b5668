"""Send overdue jobs to the queue again, so that no accepted job is lost with its message.

A queue message can disappear while its job still needs running: the broker fails over,
the API dies between accepting a job and publishing it, Celery acks a task that failed
outside the runner. The job record stays, indexed by the time it must have moved on by
(JobStore's active index). Every worker runs a reaper thread; a Redis lock lets one of
them sweep per interval. Re-sending is safe because a job is claimed once: a duplicate
message finds it running or finished and does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

import redis

from services.common.job_cleanup import remove_expired
from services.common.job_lifecycle import JobOperation, allows
from services.common.jobs import (
    FINISHED,
    JobNotFound,
    JobStatus,
    JobStore,
    TransitionRefused,
    utcnow,
)
from services.common.storage import Storage

log = logging.getLogger(__name__)

SendJob = Callable[[str], None]


class JobReaper:
    def __init__(
        self,
        jobs: JobStore,
        send: SendJob,
        redeliver_after_s: float,
        storage: Storage | None = None,
    ) -> None:
        self.jobs = jobs
        self.send = send
        self.grace = timedelta(seconds=redeliver_after_s)
        # Retention: with a storage, each sweep also deletes the jobs past their retention
        # time, stored images and record together (services/common/job_cleanup.py).
        self.storage = storage

    def sweep(self, now: datetime | None = None) -> list[str]:
        """Send every overdue job again; returns their ids."""
        now = now or utcnow()
        return [job_id for job_id in self.jobs.overdue(now) if self.resend(job_id, now)]

    def resend(self, job_id: str, now: datetime | None = None) -> bool:
        """Send the job to the queue again if it is waiting for a worker (queued, or
        running under a lapsed lease); whether it was sent."""
        now = now or utcnow()
        try:
            job = self.jobs.get(job_id)
        except JobNotFound:  # the record expired
            self.jobs.expire(job_id)
            return False
        if job.status in FINISHED:
            self.jobs.expire(job_id)
            return False
        if not allows(JobOperation.requeue, job, now):
            return False  # its lease was renewed after the index was read
        log.warning(
            "job %s is %s and overdue; sending it to the queue again",
            job_id,
            "queued" if job.status == JobStatus.queued else "running under a lapsed lease",
        )
        # Sent first: if sending fails, the next sweep tries again.
        self.send(job_id)
        # Not again before a worker had time to pick this message up (unless a worker
        # claimed it meanwhile: then its lease is its deadline).
        with contextlib.suppress(TransitionRefused, JobNotFound):
            self.jobs.requeue(job_id, retry_at=now + self.grace, now=now)
        return True

    def keep_sweeping(self, interval_s: float) -> threading.Event:
        """Sweep every `interval_s` in a daemon thread, one worker per interval (a lock in
        Redis); set the returned event to stop."""
        stop = threading.Event()
        lock = f"{self.jobs.namespace}:reaper"

        def loop() -> None:
            while not stop.wait(interval_s):
                try:
                    if self.jobs.redis.set(lock, "1", nx=True, px=int(interval_s * 1000)):
                        self.sweep()
                        if self.storage is not None:
                            remove_expired(self.jobs, self.storage, utcnow())
                except redis.RedisError as exc:  # Redis away: the next round tries again
                    log.warning("job reaper could not sweep: %s", exc)
                except Exception:
                    log.exception("job reaper sweep failed")

        threading.Thread(target=loop, name="job-reaper", daemon=True).start()
        return stop
