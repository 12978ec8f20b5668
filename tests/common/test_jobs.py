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
