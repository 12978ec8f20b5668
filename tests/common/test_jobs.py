"""The job record in a real Redis: creation, compare-and-set transitions, expiry."""

import threading

import pytest
import redis

from services.common.jobs import (
    EditJob,
    EditParams,
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
    assert 0 < store.redis.ttl(f"instructedit:job:{job.id}") <= 120


def test_seed_is_chosen_when_absent():
    seeds = {EditParams(prompt="x").seed for _ in range(20)}
    assert len(seeds) > 1


def test_unknown_job(store):
    with pytest.raises(JobNotFound):
        store.get("nope")


def test_transition_respects_allowed_states(store):
    job = EditJob.new(EditParams(prompt="x"), "image/png")
    store.create(job)
    store.transition(job.id, {JobStatus.queued}, status=JobStatus.canceled, finished_at=utcnow())
    with pytest.raises(TransitionRefused) as info:
        store.transition(job.id, {JobStatus.queued, JobStatus.running}, status=JobStatus.running)
    assert info.value.job.status == JobStatus.canceled


def _race(store, job_id, statuses):
    results = []
    barrier = threading.Barrier(len(statuses))

    def attempt(status):
        barrier.wait()
        try:
            store.transition(job_id, {JobStatus.queued}, status=status)
            results.append(status)
        except TransitionRefused:
            pass

    threads = [threading.Thread(target=attempt, args=(s,)) for s in statuses]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_racing_transitions_exactly_one_wins(store):
    """A cancel and a worker start racing on one job: exactly one of them applies."""
    for _ in range(20):
        job = EditJob.new(EditParams(prompt="x"), "image/png")
        store.create(job)
        results = _race(store, job.id, [JobStatus.running, JobStatus.canceled])
        assert len(results) == 1
        assert store.get(job.id).status == results[0]


def test_unfinished_jobs_are_indexed_by_when_they_must_have_moved_on(redis_url):
    from datetime import timedelta

    store = JobStore(redis.Redis.from_url(redis_url), ttl_s=120, redeliver_after_s=30)
    job = EditJob.new(EditParams(prompt="make it red"), "image/png")
    store.create(job)
    # Queued: due `redeliver_after_s` after it was accepted.
    assert store.overdue(job.created_at + timedelta(seconds=29)) == []
    assert store.overdue(job.created_at + timedelta(seconds=31)) == [job.id]
    # Running: due when its lease lapses.
    lease = utcnow() + timedelta(seconds=300)
    store.transition(job.id, {JobStatus.queued}, status=JobStatus.running, lease_expires_at=lease)
    assert store.overdue(lease - timedelta(seconds=1)) == []
    assert store.overdue(lease + timedelta(seconds=1)) == [job.id]
    store.postpone(job.id, lease + timedelta(seconds=60))
    assert store.overdue(lease + timedelta(seconds=1)) == []
    # Finished: out of the index, and postponing does not bring it back.
    store.transition(job.id, {JobStatus.running}, status=JobStatus.succeeded)
    far = lease + timedelta(days=1)
    assert store.overdue(far) == []
    store.postpone(job.id, lease)
    assert store.overdue(far) == []


def test_deleted_job_leaves_the_index(redis_url):
    from datetime import timedelta

    store = JobStore(redis.Redis.from_url(redis_url), ttl_s=120, redeliver_after_s=1)
    job = EditJob.new(EditParams(prompt="make it red"), "image/png")
    store.create(job)
    store.delete(job.id)
    assert store.overdue(utcnow() + timedelta(days=1)) == []
