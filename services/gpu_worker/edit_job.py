"""Edit jobs from record to result: claim, gather a batch, run the engine, store outputs.

Every way a job can end is decided here, so that no job is ever left `running`.

A queue message names one job. The worker claims it, then also claims up to
`max_batch - 1` other queued jobs with the same batch key (from the pending index the API
keeps) and runs them together. Their own messages arrive later and find nothing to do.

A claim is a lease with an owner token, kept alive by a heartbeat thread while the worker
holds the job. If the worker dies, the lease lapses and whichever message comes next for
the job (redelivered, deferred until then, or sent again by the reaper) runs it again.
Every later change the worker makes checks the token, so a worker that lost its claim
can neither move the job nor publish outputs; outputs are written under the claim's own
keys, so it never overwrites those of the worker that took over.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import redis
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from services.common.edit_params import EditParams, OutputSize, batch_key
from services.common.images import (
    OUTPUT_FORMATS,
    ImageRejected,
    decode_image,
    encode_output,
    prepare_input,
    prepare_mask,
)
from services.common.jobs import (
    EditJob,
    JobError,
    JobErrorCode,
    JobNotFound,
    JobStatus,
    JobStore,
    TransitionRefused,
    output_key,
    utcnow,
)
from services.common.logging import bind_request_id
from services.common.storage import ObjectNotFound, Storage, StorageError
from services.gpu_worker.engine import EditEngine, EditRequest, LeaveBatch, is_out_of_memory
from services.gpu_worker.full_resolution import to_output

log = logging.getLogger(__name__)


class JobCanceled(LeaveBatch):
    """The API canceled the job: it leaves the batch at the next step."""


class ClaimLost(LeaveBatch):
    """Another worker took the job over (this one was presumed dead): leave it to them."""


class JobFailure(Exception):
    """The job cannot run, for a reason the client is told in its `error`."""

    def __init__(self, code: JobErrorCode, detail: str | None = None) -> None:
        self.error = JobError.of(code, detail)
        super().__init__(self.error.message)


@dataclass(frozen=True)
class Deferred:
    """The job is held by another live worker; look again after `seconds`."""

    seconds: float


@dataclass
class _Loaded:
    job: EditJob
    request: EditRequest
    # The upright sRGB input at its own size and the job's mask at that size: what the
    # outputs are made at full resolution from, and what a mask keeps exactly.
    original: Image.Image
    mask: Image.Image | None


class EditRunner:
    def __init__(
        self,
        engine: EditEngine | None,
        jobs: JobStore,
        storage: Storage,
        max_batch: int = 1,
        batch_window_ms: int = 0,
        lease_s: float = 60.0,
        engine_error: str | None = None,
        observer=None,
    ) -> None:
        self.engine = engine
        self.jobs = jobs
        self.storage = storage
        self.max_batch = max_batch
        self.batch_window_s = batch_window_ms / 1000
        self.lease = timedelta(seconds=lease_s)
        self.engine_error = engine_error
        self.observer = observer

    # -- entry point -------------------------------------------------------------------

    def handle(self, job_id: str) -> dict[str, JobStatus] | Deferred | None:
        """Run the job named by a queue message, with whatever can join it.

        Returns each run job's final status, Deferred when another live worker holds the
        job, or None when there is nothing to do (finished, canceled or expired).
        """
        try:
            job = self._claim(job_id)
        except JobNotFound:
            log.warning("job %s has no record (expired or never created); dropping it", job_id)
            return None
        except TransitionRefused as refused:
            held = refused.job
            if held.status == JobStatus.running and held.lease_expires_at:
                wait = (held.lease_expires_at - utcnow()).total_seconds()
                return Deferred(max(wait, 0.0) + 0.5)
            log.info("job %s is %s; not running it", job_id, held.status)
            return None
        with bind_request_id(job.request_id, job.id), self._heartbeat([job]) as held:
            batch = [job, *self._gather(job)]
            held.extend(batch[1:])
            return self.run(batch)

    @contextlib.contextmanager
    def _heartbeat(self, jobs: list[EditJob]) -> Iterator[list[EditJob]]:
        """Renew the leases of the held jobs every third of a lease until the block ends:
        loading, batching, decoding and writing outputs are covered, not only the steps.
        Yields the list of held jobs, which the caller may extend."""
        held = list(jobs)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease.total_seconds() / 3):
                for job in list(held):
                    try:
                        self.jobs.renew_lease(job, self.lease)
                    except (TransitionRefused, JobNotFound):
                        held.remove(job)  # finished, canceled or taken over
                    except redis.RedisError as exc:
                        log.warning("could not renew the lease of job %s: %s", job.id, exc)

        thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        thread.start()
        try:
            yield held
        finally:
            stop.set()
            thread.join(timeout=5)  # a beat stuck on a dead Redis must not hold the task

    # -- claiming ----------------------------------------------------------------------

    def _claim(self, job_id: str, queued_only: bool = False) -> EditJob:
        claim = self.jobs.claim(job_id, self.lease, queued_only=queued_only)
        if self.observer and not claim.took_over:
            self.observer.job_started(claim.job)
        return claim.job

    def _gather(self, first: EditJob) -> list[EditJob]:
        """Claim up to max_batch - 1 queued jobs sharing `first`'s batch key."""
        if self.max_batch <= 1 or not first.batch_key:
            return []
        joined: list[EditJob] = []
        deadline = time.monotonic() + self.batch_window_s
        while True:
            for job_id in self.jobs.pending(first.batch_key, 4 * self.max_batch):
                if len(joined) >= self.max_batch - 1:
                    break
                try:
                    joined.append(self._claim(job_id, queued_only=True))
                except (TransitionRefused, JobNotFound):
                    # Not claimable (the claim itself takes a job off the index).
                    self.jobs.remove_pending(first.batch_key, job_id)
            if len(joined) >= self.max_batch - 1 or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        if joined:
            log.info("job %s runs in a batch with %s", first.id, [j.id for j in joined])
        return joined

    # -- running -----------------------------------------------------------------------

    def run(self, batch: list[EditJob]) -> dict[str, JobStatus | None]:
        """Run claimed jobs; every one of them ends here, whatever goes wrong."""
        results: dict[str, JobStatus | None] = {}
        try:
            self._run_into(batch, results)
        except Exception as exc:
            # Anything unforeseen (a bug, a time limit outside the engine): fail what is
            # still running rather than leave it `running` until its lease lapses.
            if isinstance(exc, SoftTimeLimitExceeded):
                error = JobError.of(JobErrorCode.timeout)
            else:
                log.exception("running batch %s failed", [job.id for job in batch])
                error = _internal_error(exc)
            for job in batch:
                if job.id not in results:
                    results[job.id] = self._fail(job, error)
        return results

    def _run_into(self, batch: list[EditJob], results: dict[str, JobStatus | None]) -> None:
        groups: dict[str, list[_Loaded]] = {}
        for job in batch:
            try:
                loaded = self._load(job)
            except JobFailure as failure:
                results[job.id] = self._fail(job, failure.error)
                continue
            key = batch_key(loaded.request.image.size, job.params)
            groups.setdefault(key, []).append(loaded)
        # Jobs normally share one key; a worker serving another resolution budget than
        # the API keys by sees other buckets, so group by what the engine really gets.
        for group in groups.values():
            self._run_group(group, results)

    def _load(self, job: EditJob) -> _Loaded:
        if self.engine is None:
            raise JobFailure(JobErrorCode.model_unavailable, self.engine_error)
        raw = self._read(job.input_key, "the input image")
        try:
            original = prepare_input(decode_image(raw).image)
            mask = None
            if job.mask_key:
                mask_data = self._read(job.mask_key, "the mask")
                mask = prepare_mask(mask_data, original.size, job.params.mask_invert)
        except ImageRejected as exc:
            raise JobFailure(JobErrorCode.input_invalid, exc.message) from None
        bucket = self.engine.bucket_for(*original.size)
        model_input = _resized(original, bucket, Image.Resampling.LANCZOS)
        model_mask = None if mask is None else _resized(mask, bucket, Image.Resampling.BILINEAR)
        request = EditRequest(model_input, job.params, self._progress_reporter(job), model_mask)
        return _Loaded(job, request, original, mask)

    def _read(self, key: str, what: str) -> bytes:
        try:
            return self.storage.get(key)
        except ObjectNotFound:
            raise JobFailure(JobErrorCode.input_missing, key) from None
        except StorageError as exc:
            raise JobFailure(JobErrorCode.storage_error, f"could not read {what}: {exc}") from None

    def _progress_reporter(self, job: EditJob):
        def on_step(step: int, total: int) -> None:
            try:
                self.jobs.report_progress(job, step, total, self.lease)
            except TransitionRefused as refused:
                # It leaves the batch before the next step.
                if refused.job.status == JobStatus.canceled:
                    raise JobCanceled from None
                raise ClaimLost from None  # another worker holds or finished it

        return on_step

    def _run_group(self, group: list[_Loaded], results: dict[str, JobStatus | None]) -> None:
        started = time.perf_counter()
        failure: JobError | None = None
        try:
            outcomes = self.engine.predict_batch([item.request for item in group])
        except SoftTimeLimitExceeded:
            failure = JobError.of(JobErrorCode.timeout)
        except Exception as exc:
            if is_out_of_memory(exc):
                failure = JobError.of(JobErrorCode.out_of_memory)
            else:
                log.exception("batch %s failed", [item.job.id for item in group])
                failure = _internal_error(exc)
        # Outside the except block: the traceback no longer pins the batch's tensors.
        if failure is not None and failure.code == JobErrorCode.out_of_memory:
            _release_gpu_memory()
            if len(group) > 1:
                # The batch was too big, not necessarily any one job: run them one by one.
                log.warning("batch of %d ran out of GPU memory; running its jobs alone", len(group))
                for item in group:
                    self._run_group([item], results)
                return
        if failure is not None:
            for item in group:
                results[item.job.id] = self._fail(item.job, failure)
            return
        engine_s = time.perf_counter() - started
        for item, outcome in zip(group, outcomes, strict=True):
            with bind_request_id(item.job.request_id, item.job.id):
                results[item.job.id] = self._record_outcome(item, outcome, engine_s)

    def _finish(self, item: _Loaded, edited: Image.Image) -> bytes:
        """One output as the client asked for it: at the photo's size with its detail
        kept, or at the model's; masked-out pixels the input's; encoded."""
        params: EditParams = item.job.params
        model_input = item.request.image
        size = item.original.size if params.output_size == OutputSize.input else model_input.size
        image = to_output(
            item.original,
            model_input,
            edited,
            size,
            item.mask,
            params.mask_feather,
            device=self.engine.device,
        )
        return encode_output(image, params.output_format, params.output_quality)

    def _record_outcome(self, item: _Loaded, outcome, engine_s: float) -> JobStatus | None:
        job = item.job
        if isinstance(outcome, JobCanceled):
            log.info("job %s was canceled while running", job.id)
            self._observe_canceled(job, engine_s)
            return JobStatus.canceled
        if isinstance(outcome, ClaimLost):
            log.warning("job %s was taken over by another worker; leaving it to them", job.id)
            return None
        if isinstance(outcome, BaseException):
            if is_out_of_memory(outcome):
                return self._fail(job, JobError.of(JobErrorCode.out_of_memory))
            return self._fail(job, _internal_error(outcome))
        keys: list[str] = []
        fmt = OUTPUT_FORMATS[job.params.output_format]
        try:
            for index, image in enumerate(outcome):
                data = self._finish(item, image)
                key = output_key(job.id, index, job.lease_owner or "unowned", fmt.extension)
                keys.append(key)
                self.storage.put(key, data, fmt.content_type)
        except StorageError as exc:
            self._discard(keys)
            error = JobError.of(JobErrorCode.storage_error, f"could not store the outputs: {exc}")
            return self._fail(job, error)
        try:
            done = self.jobs.succeed(job, keys)
        except (TransitionRefused, JobNotFound) as refused:
            # Canceled as it finished, or taken over: these outputs belong to no job.
            self._discard(keys)
            if isinstance(refused, TransitionRefused) and refused.job.status == JobStatus.canceled:
                log.info("job %s was canceled as it finished", job.id)
                self._observe_canceled(job, engine_s)
                return JobStatus.canceled
            log.warning("job %s was taken over by another worker; dropped its outputs", job.id)
            return None
        log.info("job %s succeeded (batch engine time %.2fs)", job.id, engine_s)
        if self.observer:
            self.observer.job_finished(done, engine_s)
        return JobStatus.succeeded

    def _discard(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.storage.delete(key)
            except StorageError as exc:
                log.warning("could not delete %s: %s", key, exc)

    def _observe_canceled(self, job: EditJob, engine_s: float) -> None:
        if not self.observer:
            return
        with contextlib.suppress(JobNotFound):
            self.observer.job_finished(self.jobs.get(job.id), engine_s)

    def _fail(self, job: EditJob, error: JobError) -> JobStatus | None:
        with bind_request_id(job.request_id, job.id):
            log.warning("job %s failed: %s: %s", job.id, error.code, error.message)
        try:
            failed = self.jobs.fail(job, error)
        except (TransitionRefused, JobNotFound):
            return None
        if self.observer:
            self.observer.job_finished(failed, 0.0)
        return JobStatus.failed


def _resized(image: Image.Image, size: tuple[int, int], resample) -> Image.Image:
    return image if image.size == size else image.resize(size, resample)


def _internal_error(exc: BaseException) -> JobError:
    return JobError.of(JobErrorCode.internal_error, f"{type(exc).__name__}: {exc}")


def _release_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
