"""Accepting an edit job: store its input, record it, index it as pending and queue it.

A failing step undoes what the ones before it did, so that a client told 503 leaves
behind neither an input no job points at nor a job that may still run (unless Redis
fails for the undoing too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis
from celery import Celery

from services.api.errors import job_store_unavailable, queue_unavailable
from services.common.jobs import (
    EditJob,
    JobNotFound,
    JobStore,
    SubmissionRefused,
    TransitionRefused,
)
from services.common.queues import enqueue_edit
from services.common.storage import Storage

log = logging.getLogger(__name__)


def submit_job(
    job: EditJob,
    data: bytes,
    jobs: JobStore,
    storage: Storage,
    celery: Celery,
    mask: bytes | None = None,
) -> EditJob:
    """The job as it stands once accepted, its mask (if any) stored beside its input;
    raises a 503 APIError, or StorageError when the uploads cannot be stored (after
    deleting whatever of them was)."""
    storage.put(job.input_key, data, job.input_content_type)
    if job.mask_key:
        try:
            storage.put(job.mask_key, mask or b"", "application/octet-stream")
        except Exception:
            _quietly(f"deleting input of job {job.id}", storage.delete, job.input_key)
            raise
    try:
        job = jobs.create(job)
    except (SubmissionRefused, TransitionRefused):
        # A limit refused it (or, impossibly, the id was taken): nothing may stay stored.
        for key in filter(None, (job.input_key, job.mask_key)):
            _quietly(f"deleting {key}", storage.delete, key)
        raise
    except redis.RedisError as exc:
        log.error("recording job %s failed: %r", job.id, exc)
        # A write that timed out may still have landed; the record must not outlive its input.
        _quietly(f"deleting record of job {job.id}", jobs.delete, job.id)
        for key in filter(None, (job.input_key, job.mask_key)):
            _quietly(f"deleting {key}", storage.delete, key)
        raise job_store_unavailable() from None
    try:
        jobs.add_pending(job)
        enqueue_edit(celery, job.id)
    except Exception as exc:
        log.error("enqueueing job %s failed: %r", job.id, exc)
        return _fail_unqueued(job, jobs)
    return job


def _fail_unqueued(job: EditJob, jobs: JobStore) -> EditJob:
    """End a job whose queueing failed, unless a worker got to it anyway.

    Workers also gather queued jobs from the pending index, so the job may already be
    running with another job's message: then it is accepted after all.
    """
    try:
        jobs.fail_unqueued(job.id)
    except TransitionRefused as refused:
        log.info("job %s was taken by a worker although queueing it failed", job.id)
        return refused.job
    except (JobNotFound, redis.RedisError) as exc:
        # Redis is gone too, so nothing more can be undone from here.
        log.error("marking unqueued job %s failed did not work: %r", job.id, exc)
        raise queue_unavailable() from None
    raise queue_unavailable()


def _quietly(what: str, fn: Callable[..., object], *args: object) -> None:
    """Best-effort cleanup on a path that already failed: its own failure is only logged."""
    try:
        fn(*args)
    except Exception as exc:
        log.error("%s failed: %r", what, exc)
