"""Retention and deletion of edit jobs: the record, its indexes and every stored image go
together, and only once the job's retention time has passed."""

from datetime import timedelta

import pytest
import redis

from services.common.edit_params import EditParams
from services.common.job_cleanup import delete_job, remove_expired
from services.common.jobs import (
    RECORD_GRACE_S,
    EditJob,
    JobNotFound,
    JobStore,
    output_key,
    utcnow,
)
from services.common.storage import FileStorage

TTL_S = 60
LEASE = timedelta(seconds=60)


@pytest.fixture
def jobs(redis_url):
    return JobStore(redis.Redis.from_url(redis_url), ttl_s=TTL_S)


@pytest.fixture
def storage(tmp_path):
    return FileStorage(tmp_path / "storage")


def _job(jobs, storage, owner="k1", mask=False) -> EditJob:
    job = EditJob.new(EditParams(prompt="x"), "image/png", owner=owner, with_mask=mask)
    storage.put(job.input_key, b"input")
    if job.mask_key:
        storage.put(job.mask_key, b"mask")
    return jobs.create(job)


def _succeed(jobs, storage, job) -> EditJob:
    claimed = jobs.claim(job.id, LEASE).job
    keys = [output_key(job.id, i, claimed.lease_owner) for i in range(2)]
    for key in keys:
        storage.put(key, b"output")
    # An earlier attempt's leftover, which the record no longer names.
    storage.put(output_key(job.id, 0, "deadbeef"), b"stale")
    return jobs.succeed(claimed, keys)


def _redis_names(jobs, job_id) -> list[bytes]:
    return [name for name in jobs.redis.scan_iter() if job_id.encode() in name]


def _index_members(jobs, job_id) -> list[bytes]:
    """Index keys (sorted sets) that still list the job."""
    found = []
    for name in jobs.redis.scan_iter():
        if jobs.redis.type(name) == b"zset" and jobs.redis.zscore(name, job_id) is not None:
            found.append(name)
    return found


def test_record_outlives_retention_by_the_grace(jobs, storage):
    job = _job(jobs, storage)
    ttl = jobs.redis.ttl(f"instructedit:job:{job.id}")
    assert TTL_S < ttl <= TTL_S + RECORD_GRACE_S
    done = _succeed(jobs, storage, job)
    ttl = jobs.redis.ttl(f"instructedit:job:{done.id}")
    assert TTL_S < ttl <= TTL_S + RECORD_GRACE_S


def test_retention_is_due_only_after_ttl(jobs, storage):
    job = _job(jobs, storage)
    created = job.created_at
    assert jobs.retention_due(created + timedelta(seconds=TTL_S - 1)) == []
    assert jobs.retention_due(created + timedelta(seconds=TTL_S + 1)) == [job.id]


def test_finished_job_retention_counts_from_its_end(jobs, storage):
    job = _job(jobs, storage)
    done = _succeed(jobs, storage, job)
    assert jobs.retention_due(done.finished_at + timedelta(seconds=TTL_S - 1)) == []
    assert jobs.retention_due(done.finished_at + timedelta(seconds=TTL_S + 1)) == [job.id]


def test_remove_expired_deletes_record_and_every_object(jobs, storage):
    queued = _job(jobs, storage, mask=True)
    succeeded = _succeed(jobs, storage, _job(jobs, storage))
    assert len(storage.list(f"edits/{succeeded.id}/")) == 4
    later = utcnow() + timedelta(seconds=TTL_S + 5)

    assert remove_expired(jobs, storage, now=later) == 2

    assert storage.list("") == []
    for job in (queued, succeeded):
        with pytest.raises(JobNotFound):
            jobs.get(job.id)
        assert _redis_names(jobs, job.id) == []
        assert _index_members(jobs, job.id) == []
    assert jobs.owned("k1", 10) == ([], None)
    assert jobs.retention_due(later) == []
    # A second sweep has nothing left to do.
    assert remove_expired(jobs, storage, now=later) == 0


def test_remove_expired_leaves_jobs_not_yet_due(jobs, storage):
    old = _job(jobs, storage)
    cutoff = utcnow() + timedelta(seconds=TTL_S + 1)
    young = EditJob.new(EditParams(prompt="x"), "image/png", owner="k1")
    young = young.model_copy(update={"created_at": cutoff})
    storage.put(young.input_key, b"input")
    jobs.create(young)

    assert remove_expired(jobs, storage, now=cutoff) == 1

    with pytest.raises(JobNotFound):
        jobs.get(old.id)
    assert jobs.get(young.id) == young
    assert storage.list("") == [young.input_key]
    assert [j.id for j in jobs.owned("k1", 10)[0]] == [young.id]


def test_remove_expired_still_deletes_images_of_a_record_redis_dropped(jobs, storage):
    job = _job(jobs, storage)
    jobs.redis.delete(f"instructedit:job:{job.id}")  # Redis expired it (past the grace)
    assert remove_expired(jobs, storage, now=utcnow() + timedelta(seconds=TTL_S + 5)) == 1
    assert storage.list("") == []
    assert jobs.retention_due(utcnow() + timedelta(days=1)) == []


def test_remove_expired_honours_the_limit(jobs, storage):
    made = [_job(jobs, storage) for _ in range(3)]
    later = utcnow() + timedelta(seconds=TTL_S + 5)
    assert remove_expired(jobs, storage, now=later, limit=2) == 2
    assert remove_expired(jobs, storage, now=later, limit=2) == 1
    for job in made:
        with pytest.raises(JobNotFound):
            jobs.get(job.id)


def test_storage_failure_keeps_the_record_for_the_next_sweep(jobs, storage, monkeypatch):
    job = _job(jobs, storage)
    later = utcnow() + timedelta(seconds=TTL_S + 5)

    def broken(prefix):
        raise OSError("disk gone")

    monkeypatch.setattr(storage, "delete_prefix", broken)
    assert remove_expired(jobs, storage, now=later) == 0
    assert jobs.get(job.id).id == job.id
    assert jobs.retention_due(later) == [job.id]
    monkeypatch.undo()
    assert remove_expired(jobs, storage, now=later) == 1
    assert storage.list("") == []


def test_delete_job_removes_webhook_deliveries_and_events(jobs, storage):
    job = _succeed(jobs, storage, _job(jobs, storage))
    jobs.redis.rpush(jobs.deliveries_key(job.id), b"{}")
    assert jobs.redis.exists(jobs.events_key(job.id))
    delete_job(jobs, storage, job)
    assert _redis_names(jobs, job.id) == []
    assert _index_members(jobs, job.id) == []
    assert storage.list("") == []


def test_a_dropped_unfinished_record_stops_counting_against_its_owner(redis_url, storage):
    """A job whose record Redis dropped while it was still queued (the reaper was away
    past the grace): once retention removed it, it no longer counts toward its owner's
    cap of unfinished jobs, nor shows in the owner's listing index."""
    jobs = JobStore(redis.Redis.from_url(redis_url), ttl_s=TTL_S, max_unfinished_per_owner=1)
    job = _job(jobs, storage)
    jobs.redis.delete(f"instructedit:job:{job.id}")
    assert remove_expired(jobs, storage, now=utcnow() + timedelta(seconds=TTL_S + 5)) == 1
    assert _index_members(jobs, job.id) == []
    # The owner may have an unfinished job again.
    jobs.create(EditJob.new(EditParams(prompt="x"), "image/png", owner="k1"))
