"""Deleting an edit job with everything it left: its stored images and its records.

Used by DELETE /v1/edits/{id} and by retention (the workers' reaper). The images go
first: a failure leaves the record (and its retention entry) for the next try, never
images that no record points at.
"""

from __future__ import annotations

import logging
from datetime import datetime

from services.common.jobs import EditJob, JobNotFound, JobStore, job_prefix
from services.common.storage import Storage

log = logging.getLogger(__name__)


def delete_job(jobs: JobStore, storage: Storage, job: EditJob) -> None:
    """Delete the job's input, mask and outputs (every attempt's), then its record, event
    stream and index entries. Raises StorageError with the record left in place."""
    storage.delete_prefix(job_prefix(job.id))
    jobs.delete(job.id, owner=job.owner, batch_key=job.batch_key)
    jobs.redis.delete(jobs.deliveries_key(job.id))


def remove_expired(jobs: JobStore, storage: Storage, now: datetime, limit: int = 100) -> int:
    """Retention: delete the jobs whose retention time passed, images and record together.
    Returns how many were removed."""
    removed = 0
    for job_id in jobs.retention_due(now, limit):
        try:
            job = jobs.get(job_id)
        except JobNotFound:
            # Redis dropped the record (it outlives retention by RECORD_GRACE_S): the
            # images are still found by the id.
            job = None
        try:
            if job is None:
                storage.delete_prefix(job_prefix(job_id))
                jobs.delete(job_id, owner=jobs.owner_of(job_id))
            else:
                delete_job(jobs, storage, job)
        except Exception as exc:  # the next sweep tries again
            log.warning("removing expired job %s failed: %r", job_id, exc)
            continue
        removed += 1
    return removed
