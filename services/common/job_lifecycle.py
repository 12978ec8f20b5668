"""The edit job's state machine: which operation may move a job from which status, and to
which status.

JobStore (jobs.py) is the only writer of job records: each of its operations checks this
table against the current record and applies its change compare-and-set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.common.jobs import EditJob


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


FINISHED = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})
UNFINISHED = frozenset({JobStatus.queued, JobStatus.running})


class JobOperation(StrEnum):
    create = "create"  # the API accepted the job
    claim = "claim"  # a worker takes the job its message named
    claim_queued = "claim_queued"  # a worker takes a waiting job into its batch
    # The worker's progress publisher, for all its jobs in one round trip
    # (JobStore.report_progress_many): a lease renewal, and the denoising's progress
    # (renewing the lease too, in JobStore.report_progress).
    renew_lease = "renew_lease"
    report_progress = "report_progress"
    succeed = "succeed"
    fail = "fail"  # the worker could not run it
    fail_unqueued = "fail_unqueued"  # the API could not queue it
    cancel = "cancel"
    requeue = "requeue"  # the reaper sent it to the queue again
    expire = "expire"  # the reaper drops a job whose record expired


# A guard sees the current record, the owner token the caller's claim carries (None
# for callers that hold no claim) and the time of the change.
Guard = Callable[["EditJob", str | None, datetime], bool]


def lease_lapsed(job: EditJob, now: datetime) -> bool:
    return job.lease_expires_at is not None and job.lease_expires_at <= now


def holds_claim(job: EditJob, owner: str | None, now: datetime) -> bool:
    """The record still carries the caller's claim: a worker that lost it (presumed dead,
    then taken over) can no longer move the job."""
    return job.lease_owner == owner


def is_free(job: EditJob, owner: str | None, now: datetime) -> bool:
    """Waiting for a worker: queued, or running under a lapsed lease (its worker died)."""
    return job.status == JobStatus.queued or lease_lapsed(job, now)


@dataclass(frozen=True)
class Rule:
    sources: frozenset[JobStatus]
    # None: the status stays as it is.
    target: JobStatus | None
    guard: Guard | None = None
    # Allowed where there is no record at all (rather than JobNotFound).
    without_record: bool = False

    def allows(self, job: EditJob, owner: str | None, now: datetime) -> bool:
        return job.status in self.sources and (self.guard is None or self.guard(job, owner, now))


QUEUED = frozenset({JobStatus.queued})
RUNNING = frozenset({JobStatus.running})

LIFECYCLE: dict[JobOperation, Rule] = {
    JobOperation.create: Rule(frozenset(), JobStatus.queued, without_record=True),
    JobOperation.claim: Rule(UNFINISHED, JobStatus.running, is_free),
    JobOperation.claim_queued: Rule(QUEUED, JobStatus.running),
    JobOperation.renew_lease: Rule(RUNNING, JobStatus.running, holds_claim),
    JobOperation.report_progress: Rule(RUNNING, JobStatus.running, holds_claim),
    JobOperation.succeed: Rule(RUNNING, JobStatus.succeeded, holds_claim),
    JobOperation.fail: Rule(RUNNING, JobStatus.failed, holds_claim),
    JobOperation.fail_unqueued: Rule(QUEUED, JobStatus.failed),
    # A queued job is skipped when a worker takes it; a running one stops at its next
    # denoising step, when the worker sees this status.
    JobOperation.cancel: Rule(UNFINISHED, JobStatus.canceled),
    JobOperation.requeue: Rule(UNFINISHED, None, is_free),
    # Never an unfinished job: it would be lost with its message.
    JobOperation.expire: Rule(FINISHED, None, without_record=True),
}


def allows(operation: JobOperation, job: EditJob, now: datetime, owner: str | None = None) -> bool:
    """Whether `operation` may apply to `job` as it stands at `now`."""
    return LIFECYCLE[operation].allows(job, owner, now)
