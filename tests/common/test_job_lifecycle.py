"""Every (state, operation) pair of the job lifecycle on a real Redis: an allowed operation
changes the record and its indexes as specified here, any other is refused and leaves
both untouched.

The expectations are written out independently of job_lifecycle.LIFECYCLE, as the spec
the table must meet.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
import redis

from services.common.edit_params import EditParams
from services.common.job_lifecycle import JobOperation
from services.common.jobs import (
    RECORD_GRACE_S,
    EditJob,
    JobError,
    JobErrorCode,
    JobNotFound,
    JobStatus,
    JobStore,
    Progress,
    ProgressReport,
    TransitionRefused,
    utcnow,
)

LEASE = timedelta(seconds=60)
RETRY_AFTER = timedelta(seconds=90)
STEPS = 4
OUTPUTS = ["edits/x/a/output_0.png"]
ERROR = JobError.of(JobErrorCode.timeout)


@pytest.fixture
def store(redis_url):
    return JobStore(redis.Redis.from_url(redis_url), ttl_s=120, redeliver_after_s=30)


# -- states: how a job gets there, returning the job as its caller knows it (for the
# worker's operations, the worker's claim with its owner token) ---------------------------


def queued(store: JobStore) -> EditJob:
    params = EditParams(prompt="make it red", num_inference_steps=STEPS)
    job = EditJob.new(params, "image/png", None, (64, 48))
    store.create(job)
    store.add_pending(job)  # as the API does
    return store.get(job.id)


def running(store: JobStore) -> EditJob:
    return store.claim(queued(store).id, LEASE).job


def running_lease_lapsed(store: JobStore) -> EditJob:
    """Its worker died."""
    return store.claim(queued(store).id, -LEASE).job


def running_claim_lost(store: JobStore) -> EditJob:
    """Its worker was presumed dead and another took the job over; the first one's claim."""
    stale = running_lease_lapsed(store)
    store.claim(stale.id, LEASE)
    return stale


STATES: dict[str, Callable[[JobStore], EditJob]] = {
    "queued": queued,
    "running": running,
    "running, lease lapsed": running_lease_lapsed,
    "running, claim lost": running_claim_lost,
    "succeeded": lambda store: store.succeed(running(store), OUTPUTS),
    "failed": lambda store: store.fail(running(store), ERROR),
    "canceled": lambda store: store.cancel(queued(store).id),
}

OPERATIONS: dict[JobOperation, Callable[[JobStore, EditJob], object]] = {
    JobOperation.create: lambda store, job: store.create(job),
    JobOperation.claim: lambda store, job: store.claim(job.id, LEASE),
    JobOperation.claim_queued: lambda store, job: store.claim(job.id, LEASE, queued_only=True),
    JobOperation.renew_lease: lambda store, job: store.renew_lease(job, LEASE),
    JobOperation.report_progress: lambda store, job: store.report_progress(job, 1, STEPS, LEASE),
    JobOperation.succeed: lambda store, job: store.succeed(job, OUTPUTS),
    JobOperation.fail: lambda store, job: store.fail(job, ERROR),
    JobOperation.fail_unqueued: lambda store, job: store.fail_unqueued(job.id),
    JobOperation.cancel: lambda store, job: store.cancel(job.id),
    JobOperation.requeue: lambda store, job: store.requeue(job.id, utcnow() + RETRY_AFTER),
    JobOperation.expire: lambda store, job: store.expire(job.id),
}

HELD = {"running", "running, lease lapsed"}  # the caller still holds the claim
ALLOWED: dict[JobOperation, set[str]] = {
    JobOperation.create: set(),  # only where there is no record
    JobOperation.claim: {"queued", "running, lease lapsed"},
    JobOperation.claim_queued: {"queued"},
    JobOperation.renew_lease: HELD,
    JobOperation.report_progress: HELD,
    JobOperation.succeed: HELD,
    JobOperation.fail: HELD,
    JobOperation.fail_unqueued: {"queued"},
    JobOperation.cancel: {"queued", "running", "running, lease lapsed", "running, claim lost"},
    JobOperation.requeue: {"queued", "running, lease lapsed"},
    JobOperation.expire: {"succeeded", "failed", "canceled"},
}


# -- what an allowed operation does ------------------------------------------------------


class Within:
    """A time set during the operation (plus `offset`)."""

    def __init__(self, start: datetime, end: datetime, offset=timedelta(0)) -> None:
        self.start, self.end = start + offset, end + offset

    def __eq__(self, other: object) -> bool:
        return isinstance(other, datetime) and self.start <= other <= self.end

    def __repr__(self) -> str:
        return f"<a time in [{self.start}, {self.end}]>"


class NewToken:
    def __init__(self, old: str | None) -> None:
        self.old = old

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and len(other) == 16 and other != self.old

    def __repr__(self) -> str:
        return f"<a new owner token, not {self.old}>"


Now = Callable[..., Within]  # now() or now(offset)


def claimed(before: EditJob, now: Now) -> dict:
    return {
        "status": JobStatus.running,
        # A takeover keeps the first start.
        "started_at": before.started_at or now(),
        "lease_expires_at": now(LEASE),
        "lease_owner": NewToken(before.lease_owner),
        "progress": Progress(step=0, total=STEPS),
        "output_keys": [],
        "error": None,
    }


def finished(status: JobStatus, **fields) -> Callable[[EditJob, Now], dict]:
    return lambda before, now: {
        "status": status,
        "finished_at": now(),
        "lease_expires_at": None,
        **fields,
    }


# The record's fields each operation changes; all others must stay as they were.
CHANGES: dict[JobOperation, Callable[[EditJob, Now], dict]] = {
    JobOperation.claim: claimed,
    JobOperation.claim_queued: claimed,
    JobOperation.renew_lease: lambda before, now: {"lease_expires_at": now(LEASE)},
    JobOperation.report_progress: lambda before, now: {
        "progress": Progress(step=1, total=STEPS),
        "lease_expires_at": now(LEASE),
    },
    JobOperation.succeed: finished(JobStatus.succeeded, output_keys=OUTPUTS),
    JobOperation.fail: finished(JobStatus.failed, error=ERROR),
    JobOperation.fail_unqueued: finished(
        JobStatus.failed,
        error=JobError(code=JobErrorCode.enqueue_failed, message="the job could not be queued"),
    ),
    JobOperation.cancel: finished(JobStatus.canceled),
    JobOperation.requeue: lambda before, now: {},
    JobOperation.expire: lambda before, now: {},
}

# When the job is due in the index of unfinished jobs afterwards: when its lease lapses,
# at the reaper's retry time, or never (None: not indexed, it finished).
ACTIVE: dict[JobOperation, str | None] = {
    JobOperation.claim: "lease",
    JobOperation.claim_queued: "lease",
    JobOperation.renew_lease: "lease",
    JobOperation.report_progress: "lease",
    JobOperation.succeed: None,
    JobOperation.fail: None,
    JobOperation.fail_unqueued: None,
    JobOperation.cancel: None,
    JobOperation.requeue: "retry",
    JobOperation.expire: None,
}


def test_the_spec_covers_every_operation():
    assert set(OPERATIONS) == set(ALLOWED) == set(JobOperation)
    assert set(CHANGES) == set(ACTIVE) == set(JobOperation) - {JobOperation.create}
    assert {name.split(",")[0] for name in STATES} == set(JobStatus)


class Snapshot:
    """Everything an operation may touch: the raw record and the job's index entries."""

    def __init__(self, store: JobStore, job: EditJob) -> None:
        self.raw = store.redis.get(store._key(job.id))
        self.active = store.redis.zscore(store._active, job.id)
        self.pending = job.id in store.pending(job.batch_key, 100)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Snapshot) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return repr(vars(self))


@pytest.mark.parametrize(
    "state,operation",
    [(state, operation) for operation in JobOperation for state in STATES],
    ids=lambda value: str(value).replace(", ", "-").replace(" ", "-"),
)
def test_operation_from_state(store, state, operation):
    job = STATES[state](store)
    before = store.get(job.id)
    snapshot = Snapshot(store, job)
    apply = OPERATIONS[operation]

    if state not in ALLOWED[operation]:
        with pytest.raises(TransitionRefused) as refused:
            apply(store, job)
        assert refused.value.job == before
        assert Snapshot(store, job) == snapshot
        return

    start = utcnow()
    result = apply(store, job)
    end = utcnow()
    after = store.get(job.id)

    def now(offset=timedelta(0)) -> Within:
        return Within(start, end, offset)

    expected = {field: getattr(before, field) for field in EditJob.model_fields}
    expected.update(CHANGES[operation](before, now))
    for field, value in expected.items():
        assert value == getattr(after, field), field
    if not CHANGES[operation](before, now):
        assert store.redis.get(store._key(job.id)) == snapshot.raw  # byte-identical

    if operation in (JobOperation.claim, JobOperation.claim_queued):
        assert result.job == after
        assert result.took_over == (before.status == JobStatus.running)
    elif isinstance(result, EditJob):
        assert result == after

    active = store.redis.zscore(store._active, job.id)
    match ACTIVE[operation]:
        case "lease":
            assert active == after.lease_expires_at.timestamp()
        case "retry":
            retry = RETRY_AFTER.total_seconds()
            assert start.timestamp() + retry - 1e-3 <= active <= end.timestamp() + retry + 1e-3
        case None:
            assert active is None
    # Only a queued job waits in the pending index for a worker gathering a batch.
    assert Snapshot(store, job).pending == (after.status == JobStatus.queued)


def test_create_records_a_queued_job_due_when_its_message_is_presumed_lost(store):
    job = EditJob.new(EditParams(prompt="make it red"), "image/png")
    created = store.create(job)
    assert created == job == store.get(job.id)
    assert created.status == JobStatus.queued
    deadline = store.redis.zscore(store._active, job.id)
    assert deadline == job.created_at.timestamp() + store.redeliver_after_s


def test_without_a_record_only_create_and_expire_apply(store):
    job = EditJob.new(EditParams(prompt="make it red"), "image/png")
    store.create(job)
    store.redis.delete(store._key(job.id))  # its TTL ran out; the index entry is left
    for operation in set(JobOperation) - {JobOperation.create, JobOperation.expire}:
        with pytest.raises(JobNotFound):
            OPERATIONS[operation](store, job)
    store.expire(job.id)
    assert store.redis.zscore(store._active, job.id) is None
    assert store.redis.get(store._key(job.id)) is None


def test_every_error_code_has_its_message():
    for code in JobErrorCode:
        error = JobError.of(code)
        assert error.code == code and error.message
        assert JobError.of(code, "details").message == f"{error.message}: details"


# -- the worker's batched progress (JobStore.report_progress_many) ----------------------


@pytest.mark.parametrize("state", STATES, ids=lambda s: s.replace(", ", "-").replace(" ", "-"))
@pytest.mark.parametrize("renew", [True, False], ids=["renew", "progress-only"])
def test_batched_progress_follows_the_lifecycle(store, state, renew):
    """report_progress_many writes what report_progress would (and the lease only when
    renewed), for the same states; elsewhere it reports the refusal, touching nothing."""
    job = STATES[state](store)
    before = store.get(job.id)
    snapshot = Snapshot(store, job)
    report = ProgressReport(job, Progress(step=1, total=STEPS), renew=renew)
    start = utcnow()
    (outcome,) = store.report_progress_many([report], LEASE)
    end = utcnow()

    if state not in ALLOWED[JobOperation.report_progress]:
        assert isinstance(outcome, TransitionRefused)
        assert outcome.job == before
        assert Snapshot(store, job) == snapshot
        return
    after = store.get(job.id)
    assert outcome == after
    expected = {field: getattr(before, field) for field in EditJob.model_fields}
    expected.update(
        CHANGES[JobOperation.report_progress](before, lambda o=timedelta(0): Within(start, end, o))
    )
    if not renew:
        expected["lease_expires_at"] = before.lease_expires_at
    for field, value in expected.items():
        assert value == getattr(after, field), field
    assert store.redis.zscore(store._active, job.id) == after.lease_expires_at.timestamp()
    assert 0 < store.redis.ttl(store._key(job.id)) <= 120 + RECORD_GRACE_S


@pytest.mark.parametrize("state", STATES, ids=lambda s: s.replace(", ", "-").replace(" ", "-"))
def test_a_batched_look_changes_nothing(store, state):
    job = STATES[state](store)
    before = store.get(job.id)
    snapshot = Snapshot(store, job)
    (outcome,) = store.report_progress_many([ProgressReport(job)], LEASE)
    assert Snapshot(store, job) == snapshot
    if state in ALLOWED[JobOperation.renew_lease]:
        assert outcome == before
    else:
        assert isinstance(outcome, TransitionRefused) and outcome.job == before


def test_batched_progress_on_a_record_changed_since_the_worker_wrote_it(store):
    """The worker's copy is stale (its claim still holds): the lifecycle decides, and the
    change goes through its operation."""
    job = running(store)
    store.renew_lease(job, LEASE * 2)  # behind the worker's back, under its own claim
    (outcome,) = store.report_progress_many(
        [ProgressReport(job, Progress(step=2, total=STEPS))], LEASE
    )
    after = store.get(job.id)
    assert outcome == after
    assert (after.progress.step, after.status) == (2, JobStatus.running)


def test_batched_progress_covers_several_jobs_in_one_round_trip(store):
    held = running(store)
    canceled = running(store)
    store.cancel(canceled.id)
    gone = running(store)
    store.redis.delete(store._key(gone.id))
    reports = [ProgressReport(job, Progress(step=3, total=STEPS)) for job in (held, canceled, gone)]
    done, refused, missing = store.report_progress_many(reports, LEASE)
    assert done == store.get(held.id) and done.progress.step == 3
    assert isinstance(refused, TransitionRefused) and refused.job.status == JobStatus.canceled
    assert isinstance(missing, JobNotFound)
    assert store.redis.get(store._key(gone.id)) is None  # not brought back
