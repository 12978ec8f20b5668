"""The worker's job runner against a real Redis and file storage, with the tiny engine:
claiming, gathering compatible jobs into one batch, leases and failures."""

import contextlib
import time
from datetime import timedelta

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from services.common.buckets import bucket_for
from services.common.edit_params import EditParams
from services.common.images import decode_image, upright_size
from services.common.jobs import (
    EditJob,
    JobError,
    JobErrorCode,
    JobStatus,
    JobStore,
    TransitionRefused,
    utcnow,
)
from services.common.storage import FileStorage
from services.gpu_worker.edit_job import ClaimLost, Deferred, EditRunner
from tests.conftest import image_bytes


@pytest.fixture
def jobs(redis_url):
    return JobStore(redis.Redis.from_url(redis_url), ttl_s=300)


@pytest.fixture
def storage(tmp_path):
    return FileStorage(tmp_path / "storage")


# The tiny model's resolution budget (families/base.py): what the worker buckets by.
engine_resolution = 128


def submit(jobs, storage, steps=2, size=(64, 48), **params) -> EditJob:
    """What the API does for an accepted request."""
    data = image_bytes(size)
    decoded = decode_image(data)
    edit = EditParams(prompt="make it red", num_inference_steps=steps, **params)
    bucket = bucket_for(*upright_size(decoded.image), engine_resolution)
    job = EditJob.new(edit, "image/png", None, bucket)
    storage.put(job.input_key, data, "image/png")
    jobs.create(job)
    jobs.add_pending(job)
    return job


def runner(engine, jobs, storage, **kw):
    return EditRunner(engine, jobs, storage, **kw)


def lapse(jobs, claimed: EditJob) -> None:
    """The worker holding `claimed` died: its lease ran out without renewal."""
    jobs.renew_lease(claimed, timedelta(seconds=-1))


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
    other_size = submit(jobs, storage, size=(300, 70))  # the 256x64 bucket
    canceled = submit(jobs, storage)
    jobs.cancel(canceled.id)
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
    holder = jobs.claim(job.id, timedelta(seconds=30)).job
    outcome = runner(engine, jobs, storage).handle(job.id)
    assert isinstance(outcome, Deferred)
    assert 29 < outcome.seconds <= 31

    # The holder died: its lease lapsed without renewal.
    lapse(jobs, holder)
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
    claim, report_progress = jobs.claim, jobs.report_progress

    def claim_spy(*args, **kwargs):
        claimed = claim(*args, **kwargs)
        leases.append(claimed.job.lease_expires_at)
        return claimed

    def progress_spy(*args, **kwargs):
        job = report_progress(*args, **kwargs)
        leases.append(job.lease_expires_at)
        return job

    jobs.claim, jobs.report_progress = claim_spy, progress_spy
    runner(engine, jobs, storage, lease_s=10).handle(job.id)
    assert len(leases) == 1 + 3  # the claim, then every step
    assert leases == sorted(leases)
    assert all(lease > utcnow() + timedelta(seconds=8) for lease in leases)


class SlowStorage:
    """The real file storage, with a hook before each put (a slow or failing store)."""

    def __init__(self, inner, before_put):
        self.inner, self.before_put = inner, before_put

    def put(self, key, data, content_type="application/octet-stream"):
        self.before_put(key)
        self.inner.put(key, data, content_type)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def outputs_in(storage, job) -> list[str]:
    return [k for k in storage.list(f"edits/{job.id}/") if not k.endswith("/input")]


def test_heartbeat_keeps_the_lease_while_outputs_are_written(engine, jobs, storage):
    job = submit(jobs, storage)
    seen = []

    def slow_put(key):
        # Three lease lengths in the store: only a heartbeat keeps the claim alive.
        for _ in range(6):
            time.sleep(0.15)
            seen.append(jobs.get(job.id).lease_expires_at > utcnow())

    slow = SlowStorage(storage, slow_put)
    assert runner(engine, jobs, slow, lease_s=0.3).handle(job.id) == {job.id: JobStatus.succeeded}
    assert all(seen)


def test_a_worker_that_lost_its_claim_publishes_nothing(engine, jobs, storage):
    job = submit(jobs, storage)
    stale_runner = runner(engine, jobs, storage)
    stale = stale_runner._claim(job.id)  # worker A claims, then stalls past its lease
    lapse(jobs, stale)
    assert runner(engine, jobs, storage).handle(job.id) == {job.id: JobStatus.succeeded}
    done = jobs.get(job.id)
    assert done.lease_owner != stale.lease_owner

    # A wakes up: its progress, result and failure are all refused.
    with pytest.raises(ClaimLost):
        stale_runner._progress_reporter(stale)(1, 2)
    loaded = stale_runner._load(stale)
    image = Image.new("RGB", loaded.request.image.size)
    assert stale_runner._record_outcome(loaded, [image], 0.1) is None
    late = JobError.of(JobErrorCode.internal_error, "late")
    assert stale_runner._fail(stale, late) is None
    after = jobs.get(job.id)
    assert after.status == JobStatus.succeeded and after.output_keys == done.output_keys
    # A's outputs went under its own claim's keys and were deleted; B's are intact.
    assert outputs_in(storage, job) == done.output_keys


def test_canceled_while_writing_outputs_leaves_no_files(engine, jobs, storage):
    job = submit(jobs, storage, num_outputs=2)

    def cancel_first(key):
        with contextlib.suppress(TransitionRefused):  # as the API does
            jobs.cancel(job.id)

    results = runner(engine, jobs, SlowStorage(storage, cancel_first)).handle(job.id)
    assert results == {job.id: JobStatus.canceled}
    assert jobs.get(job.id).output_keys == []
    assert outputs_in(storage, job) == []


@pytest.mark.parametrize(
    "error,code",
    [(RuntimeError("a bug"), "internal_error"), (SoftTimeLimitExceeded(), "timeout")],
)
def test_unexpected_errors_end_every_job_of_the_batch(engine, jobs, storage, error, code):
    submitted = [submit(jobs, storage, seed=i) for i in range(3)]

    def explode(key):
        raise error

    results = runner(engine, jobs, SlowStorage(storage, explode), max_batch=8).handle(
        submitted[0].id
    )
    assert results == {job.id: JobStatus.failed for job in submitted}
    for job in submitted:
        record = jobs.get(job.id)
        assert record.status == JobStatus.failed and record.error.code == code
        assert record.lease_expires_at is None


def test_out_of_memory_batch_runs_its_jobs_alone(engine, jobs, storage):
    submitted = [submit(jobs, storage, seed=i) for i in range(3)]
    sizes = []

    def small_gpu(module, args):
        sizes.append(args[0].shape[0])
        if args[0].shape[0] > 3:  # more than one job's three branches
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = engine.pipe.unet.register_forward_pre_hook(small_gpu)
    try:
        results = runner(engine, jobs, storage, max_batch=8).handle(submitted[0].id)
    finally:
        hook.remove()
    assert results == {job.id: JobStatus.succeeded for job in submitted}
    assert sizes == [9, 3, 3, 3, 3, 3, 3]  # the batch failed, then each job alone


def test_out_of_memory_for_a_single_job_fails_it_clearly(engine, jobs, storage):
    job = submit(jobs, storage)

    def no_memory(module, args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = engine.pipe.unet.register_forward_pre_hook(no_memory)
    try:
        assert runner(engine, jobs, storage).handle(job.id) == {job.id: JobStatus.failed}
    finally:
        hook.remove()
    assert jobs.get(job.id).error.code == "out_of_memory"
