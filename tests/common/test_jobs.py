"""The job record in a real Redis: creation, compare-and-set transitions, expiry."""

import contextlib
import threading
from datetime import timedelta

import pytest
import redis

from services.common.edit_params import EditParams
from services.common.jobs import (
    RECORD_GRACE_S,
    EditJob,
    JobNotFound,
    JobStatus,
    JobStore,
    TransitionRefused,
    utcnow,
)


@pytest.fixture
def store(redis_url):
    return JobStore(redis.Redis.from_url(redis_url), ttl_s=120)


def test_create_and_read_back(store):
    job = EditJob.new(EditParams(prompt="make it red", seed=7), "image/png", "req-1")
    store.create(job)
    loaded = store.get(job.id)
    assert loaded == job
    assert loaded.input_key == f"edits/{job.id}/input"
    # Retention (120 s) plus the grace that lets the reaper find whose it was.
    assert 120 < store.redis.ttl(f"instructedit:job:{job.id}") <= 120 + RECORD_GRACE_S


def test_seed_is_chosen_when_absent():
    seeds = {EditParams(prompt="x").seed for _ in range(20)}
    assert len(seeds) > 1


def test_unknown_job(store):
    with pytest.raises(JobNotFound):
        store.get("nope")


LEASE = timedelta(seconds=60)


def test_operations_respect_the_lifecycle(store):
    job = EditJob.new(EditParams(prompt="x"), "image/png")
    store.create(job)
    store.cancel(job.id)
    with pytest.raises(TransitionRefused) as info:
        store.claim(job.id, LEASE)
    assert info.value.job.status == JobStatus.canceled


def _race(store, job_id, operations):
    results = []
    barrier = threading.Barrier(len(operations))

    def attempt(operation):
        barrier.wait()
        with contextlib.suppress(TransitionRefused):
            results.append(operation(job_id).status)

    threads = [threading.Thread(target=attempt, args=(o,)) for o in operations]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_racing_claims_exactly_one_wins(store):
    """Two workers taking one queued job (its message, and a batch gathering it)."""

    def claim(job_id):
        return store.claim(job_id, LEASE, queued_only=True).job

    for _ in range(20):
        job = EditJob.new(EditParams(prompt="x"), "image/png")
        store.create(job)
        assert len(_race(store, job.id, [claim, claim])) == 1


def test_a_cancel_racing_a_worker_start_is_never_lost(store):
    """Whichever comes first, the job ends canceled: before the claim it refuses the claim,
    after it the worker stops at its next step."""
    for _ in range(20):
        job = EditJob.new(EditParams(prompt="x"), "image/png")
        store.create(job)
        results = _race(store, job.id, [lambda i: store.claim(i, LEASE).job, store.cancel])
        assert JobStatus.canceled in results
        assert store.get(job.id).status == JobStatus.canceled


def test_unfinished_jobs_are_indexed_by_when_they_must_have_moved_on(redis_url):
    store = JobStore(redis.Redis.from_url(redis_url), ttl_s=120, redeliver_after_s=30)
    job = EditJob.new(EditParams(prompt="make it red"), "image/png")
    store.create(job)
    # Queued: due `redeliver_after_s` after it was accepted.
    assert store.overdue(job.created_at + timedelta(seconds=29)) == []
    assert store.overdue(job.created_at + timedelta(seconds=31)) == [job.id]
    # Running: due when its lease lapses.
    claimed = store.claim(job.id, timedelta(seconds=300)).job
    lease = claimed.lease_expires_at
    assert store.overdue(lease - timedelta(seconds=1)) == []
    assert store.overdue(lease + timedelta(seconds=1)) == [job.id]
    # Sent again by the reaper: not due again before its retry time.
    lapsed = lease + timedelta(seconds=1)
    store.requeue(job.id, retry_at=lease + timedelta(seconds=60), now=lapsed)
    assert store.overdue(lapsed) == []
    # Finished: out of the index, and requeueing does not bring it back.
    store.succeed(claimed, [])
    far = lease + timedelta(days=1)
    assert store.overdue(far) == []
    with pytest.raises(TransitionRefused):
        store.requeue(job.id, retry_at=lease, now=far)
    assert store.overdue(far) == []


def test_deleted_job_leaves_the_index(redis_url):
    store = JobStore(redis.Redis.from_url(redis_url), ttl_s=120, redeliver_after_s=1)
    job = EditJob.new(EditParams(prompt="make it red"), "image/png")
    store.create(job)
    store.delete(job.id)
    assert store.overdue(utcnow() + timedelta(days=1)) == []


def _pending_job(store, steps: int, created_at=None) -> EditJob:
    params = EditParams(prompt="make it red", num_inference_steps=steps)
    job = EditJob.new(params, "image/png", None, (64, 48))
    if created_at is not None:
        job = job.model_copy(update={"created_at": created_at})
    store.create(job)
    store.add_pending(job)
    return job


def test_the_oldest_pending_batch_key_is_found_across_keys(store):
    now = utcnow()
    newer = _pending_job(store, steps=2, created_at=now)
    oldest = _pending_job(store, steps=3, created_at=now - timedelta(seconds=5))
    same_key = _pending_job(store, steps=3, created_at=now - timedelta(seconds=1))
    assert store.oldest_pending(8) == (oldest.batch_key, [oldest.id, same_key.id])
    assert store.oldest_pending(1) == (oldest.batch_key, [oldest.id])
    # Claimed: off the index; a key without pending jobs is forgotten.
    for job in (oldest, same_key):
        store.claim(job.id, LEASE, queued_only=True)
    assert store.oldest_pending(8) == (newer.batch_key, [newer.id])
    assert store.redis.smembers(store._pending_keys) == {newer.batch_key.encode()}
    store.cancel(newer.id)
    assert store.oldest_pending(8) is None


def test_records_are_read_together(store):
    jobs = [_pending_job(store, steps=2) for _ in range(3)]
    assert store.get_many([j.id for j in jobs] + ["nope"]) == [*jobs, None]
    assert store.get_many([]) == []


def test_a_job_is_created_once(store):
    job = EditJob.new(EditParams(prompt="x"), "image/png")
    store.create(job)
    with pytest.raises(TransitionRefused) as refused:
        store.create(job.model_copy(update={"input_content_type": "image/jpeg"}))
    assert refused.value.job == job == store.get(job.id)
