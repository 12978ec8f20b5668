"""The worker's job runner against a real Redis and file storage, with the tiny engine:
claiming, gathering compatible jobs into one batch, leases and failures."""

import contextlib
import threading
import time
from datetime import timedelta

import pytest
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
    TransitionRefused,
    utcnow,
)
from services.common.storage import StorageError
from services.gpu_worker.edit_job import ClaimLost, Deferred, EditRunner
from services.gpu_worker.progress import ProgressPublisher
from tests.conftest import image_bytes

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


def test_the_publisher_renews_the_leases(engine, jobs, storage):
    job = submit(jobs, storage, steps=3)
    leases = []
    claim, report_many = jobs.claim, jobs.report_progress_many

    def claim_spy(*args, **kwargs):
        claimed = claim(*args, **kwargs)
        leases.append(claimed.job.lease_expires_at)
        return claimed

    def report_spy(reports, lease):
        outcomes = report_many(reports, lease)
        leases.extend(o.lease_expires_at for o, r in zip(outcomes, reports, strict=True) if r.renew)
        return outcomes

    def slow_step(module, args):
        time.sleep(0.1)  # the lease (0.3 s) would lapse twice over without renewal

    jobs.claim, jobs.report_progress_many = claim_spy, report_spy
    hook = engine.pipe.unet.register_forward_pre_hook(slow_step)
    try:
        result = runner(engine, jobs, storage, lease_s=0.3).handle(job.id)
    finally:
        hook.remove()
    assert result == {job.id: JobStatus.succeeded}
    assert len(leases) >= 1 + 2  # the claim, then a renewal every 0.1 s
    assert leases == sorted(leases)


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

    # A wakes up: its progress, result and failure are all refused. Its publisher learns
    # that the claim is lost, and the job leaves A's batch at its next step.
    with ProgressPublisher(jobs, timedelta(seconds=60)) as publisher:
        publisher.hold(stale)
        on_step = publisher.on_step(stale.id)
        on_step(1, 2)  # in memory only
        publisher.publish_now()
        assert publisher.leaving(stale.id) is ClaimLost
        with pytest.raises(ClaimLost):
            on_step(2, 2)
    assert jobs.get(job.id) == done
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


# -- pipelining: outputs on a thread pool, the next batch read ahead -------------------


class CountingStorage(SlowStorage):
    """Puts that take a while, counting how many run at once."""

    def __init__(self, inner, seconds=0.2, fail_key=None):
        self.running = self.most = 0
        self._lock = threading.Lock()

        def before_put(key):
            with self._lock:
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(seconds)
            with self._lock:
                self.running -= 1
            if fail_key and fail_key(key):
                raise StorageError(f"disk full at {key}")

        super().__init__(inner, before_put)


def test_outputs_of_every_job_are_made_and_stored_at_once(engine, jobs, storage):
    submitted = [submit(jobs, storage, seed=i, num_outputs=3) for i in range(2)]
    slow = CountingStorage(storage)
    results = runner(engine, jobs, slow, max_batch=8, io_threads=6).handle(submitted[0].id)
    assert results == {job.id: JobStatus.succeeded for job in submitted}
    assert slow.most >= 3  # six puts of 0.2 s each, not one after the other
    for job in submitted:
        done = jobs.get(job.id)
        assert len(done.output_keys) == 3
        assert sorted(outputs_in(storage, job)) == sorted(done.output_keys)


def test_an_output_that_cannot_be_stored_fails_only_its_job(engine, jobs, storage):
    good, bad = (submit(jobs, storage, seed=i, num_outputs=2) for i in range(2))
    slow = CountingStorage(storage, 0.05, fail_key=lambda key: key.startswith(f"edits/{bad.id}/"))
    results = runner(engine, jobs, slow, max_batch=8).handle(good.id)
    assert results == {good.id: JobStatus.succeeded, bad.id: JobStatus.failed}
    failed = jobs.get(bad.id)
    # Which output, never the storage's own words (they may name server paths).
    assert failed.error.code == "storage_error" and "could not store output" in failed.error.message
    assert "disk full" not in failed.error.message
    assert outputs_in(storage, bad) == []  # whatever of it was stored is deleted
    assert len(outputs_in(storage, good)) == 2


class UNetCalls:
    """Batch size (in samples) of every UNet call, and a hook at each call."""

    def __init__(self, engine, during=None):
        self.engine, self.during, self.sizes = engine, during, []

    def __enter__(self):
        def hook(module, args):
            self.sizes.append(args[0].shape[0])
            if self.during:
                self.during(len(self.sizes))

        self._hook = self.engine.pipe.unet.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self._hook.remove()


def test_the_next_batch_is_read_ahead_unclaimed_and_run_in_the_same_task(engine, jobs, storage):
    first = submit(jobs, storage, steps=4)
    # Another batch key (other steps): not gathered with the first.
    later = [submit(jobs, storage, steps=3, seed=i) for i in range(2)]
    read = []
    reading = SlowStorage(storage, lambda key: None)
    reading.get = lambda key: read.append(key) or storage.get(key)
    seen_at_last_step = {}

    def during(call):
        if call == 4:  # the first job's last step: past its halfway, so read ahead
            deadline = time.monotonic() + 10
            while not all(j.input_key in read for j in later) and time.monotonic() < deadline:
                time.sleep(0.01)
            seen_at_last_step["read"] = [j.input_key in read for j in later]
            seen_at_last_step["status"] = [jobs.get(j.id).status for j in later]

    with UNetCalls(engine, during) as unet:
        results = runner(engine, jobs, reading, max_batch=8, prefetch_batches=2).handle(first.id)
    assert results == {job.id: JobStatus.succeeded for job in [first, *later]}
    # Read while the first batch denoised, but claimed only once the GPU was free for them.
    assert seen_at_last_step == {"read": [True, True], "status": [JobStatus.queued] * 2}
    assert unet.sizes == [3] * 4 + [6] * 3  # one job (3 branches) x 4 steps, then two x 3
    for job in later:
        assert jobs.get(job.id).status == JobStatus.succeeded
        # Their own queue messages come later and find nothing to do.
        assert runner(engine, jobs, storage).handle(job.id) is None


def test_a_job_canceled_after_it_was_read_ahead_does_not_run(engine, jobs, storage):
    first = submit(jobs, storage, steps=4)
    kept, canceled = (submit(jobs, storage, steps=3, seed=i) for i in range(2))

    def during(call):
        if call == 4:
            time.sleep(0.3)  # read ahead by now
            jobs.cancel(canceled.id)

    with UNetCalls(engine, during) as unet:
        results = runner(engine, jobs, storage, max_batch=8, prefetch_batches=2).handle(first.id)
    assert results == {first.id: JobStatus.succeeded, kept.id: JobStatus.succeeded}
    assert unet.sizes == [3] * 4 + [3] * 3
    assert jobs.get(canceled.id).started_at is None


def test_no_batch_is_read_ahead_without_time_left_in_the_task(engine, jobs, storage):
    first = submit(jobs, storage, steps=2)
    later = submit(jobs, storage, steps=3)
    task = runner(engine, jobs, storage, max_batch=8, prefetch_batches=2, max_task_s=0.001)
    assert task.handle(first.id) == {first.id: JobStatus.succeeded}
    assert jobs.get(later.id).status == JobStatus.queued
