"""The worker's job runner against a real Redis and file storage, with the tiny engine:
claiming, gathering compatible jobs into one batch, leases and failures."""

from datetime import timedelta

import pytest
import redis

from services.common.images import decode_image, model_input_size, upright_size
from services.common.jobs import EditJob, EditParams, JobStatus, JobStore, utcnow
from services.common.storage import FileStorage
from services.gpu_worker.edit_job import Deferred, EditRunner
from tests.conftest import image_bytes


@pytest.fixture
def jobs(redis_url):
    return JobStore(redis.Redis.from_url(redis_url), ttl_s=300)


@pytest.fixture
def storage(tmp_path):
    return FileStorage(tmp_path / "storage")


def submit(jobs, storage, steps=2, size=(64, 48), **params) -> EditJob:
    """What the API does for an accepted request."""
    data = image_bytes(size)
    decoded = decode_image(data)
    edit = EditParams(prompt="make it red", num_inference_steps=steps, **params)
    job = EditJob.new(edit, "image/png", None, model_input_size(*upright_size(decoded.image), 64))
    storage.put(job.input_key, data, "image/png")
    jobs.create(job)
    jobs.add_pending(job)
    return job


def runner(engine, jobs, storage, **kw):
    return EditRunner(engine, jobs, storage, max_side=64, **kw)


def test_compatible_queued_jobs_join_one_batch(engine, jobs, storage):
    submitted = [submit(jobs, storage, seed=i) for i in range(4)]
    calls = []
    hook = engine.pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        results = runner(engine, jobs, storage, max_batch=8).handle(submitted[0].id)
    finally:
        hook.remove()
    assert results == {job.id: JobStatus.succeeded for job in submitted}
    assert calls == [12, 12]  # 4 jobs x 3 branches, 2 steps
    for job in submitted:
        done = jobs.get(job.id)
        assert done.status == JobStatus.succeeded
        assert done.lease_expires_at is None
        assert storage.exists(done.output_keys[0])
        # Their own queue messages come later and find nothing to do.
        assert runner(engine, jobs, storage).handle(job.id) is None
    assert jobs.pending(submitted[0].batch_key, 10) == []


def test_batch_size_is_capped(engine, jobs, storage):
    submitted = [submit(jobs, storage, seed=i) for i in range(5)]
    results = runner(engine, jobs, storage, max_batch=2).handle(submitted[0].id)
    assert set(results) == {submitted[0].id, submitted[1].id}
    assert [jobs.get(j.id).status for j in submitted[2:]] == [JobStatus.queued] * 3


def test_incompatible_and_canceled_jobs_are_not_gathered(engine, jobs, storage):
    first = submit(jobs, storage)
    other_steps = submit(jobs, storage, steps=3)
    other_size = submit(jobs, storage, size=(48, 64))
    canceled = submit(jobs, storage)
    jobs.transition(canceled.id, {JobStatus.queued}, status=JobStatus.canceled)
    results = runner(engine, jobs, storage, max_batch=8).handle(first.id)
    assert results == {first.id: JobStatus.succeeded}
    assert jobs.get(other_steps.id).status == JobStatus.queued
    assert jobs.get(other_size.id).status == JobStatus.queued
    assert jobs.get(canceled.id).started_at is None
    assert jobs.pending(first.batch_key, 10) == []


def test_one_bad_input_fails_only_its_job(engine, jobs, storage):
    good = submit(jobs, storage)
    bad = submit(jobs, storage)
    storage.delete(bad.input_key)
    results = runner(engine, jobs, storage, max_batch=8).handle(good.id)
    assert results == {good.id: JobStatus.succeeded, bad.id: JobStatus.failed}
    assert jobs.get(bad.id).error.code == "input_missing"


def test_job_held_by_a_live_worker_is_deferred_until_its_lease_lapses(engine, jobs, storage):
    job = submit(jobs, storage)
    lease_end = utcnow() + timedelta(seconds=30)
    jobs.transition(
        job.id, {JobStatus.queued}, status=JobStatus.running, lease_expires_at=lease_end
    )
    outcome = runner(engine, jobs, storage).handle(job.id)
    assert isinstance(outcome, Deferred)
    assert 29 < outcome.seconds <= 31

    # The holder died: its lease lapsed without renewal.
    jobs.transition(job.id, {JobStatus.running}, lease_expires_at=utcnow() - timedelta(seconds=1))
    assert runner(engine, jobs, storage).handle(job.id) == {job.id: JobStatus.succeeded}


def test_missing_engine_fails_jobs_with_its_reason(jobs, storage):
    job = submit(jobs, storage)
    results = EditRunner(None, jobs, storage, 64, engine_error="CUDA OOM at load").handle(job.id)
    assert results == {job.id: JobStatus.failed}
    error = jobs.get(job.id).error
    assert error.code == "model_unavailable" and "CUDA OOM at load" in error.message


def test_progress_renews_the_lease(engine, jobs, storage):
    job = submit(jobs, storage, steps=3)
    leases = []
    original = jobs.transition

    def spy(job_id, allowed, when=None, **changes):
        if "progress" in changes and changes.get("lease_expires_at"):
            leases.append(changes["lease_expires_at"])
        return original(job_id, allowed, when, **changes)

    jobs.transition = spy
    runner(engine, jobs, storage, lease_s=10).handle(job.id)
    assert len(leases) == 1 + 3  # the claim, then every step
    assert leases == sorted(leases)
    assert all(lease > utcnow() + timedelta(seconds=8) for lease in leases)
