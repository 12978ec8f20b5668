"""Edit jobs from record to result: claim, gather a batch, run the engine, store outputs.

Every way a job can end is decided here, so that no job is ever left `running`.

A queue message names one job. The worker claims it, then also claims up to
`max_batch - 1` other queued jobs with the same batch key (from the pending index the API
keeps) and runs them together. Their own messages arrive later and find nothing to do. A
claim is a lease renewed at every step: if the worker dies, the lease lapses and whichever
message comes next for the job (redelivered, or deferred until then) runs it again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import timedelta

from celery.exceptions import SoftTimeLimitExceeded

from services.common.images import ImageRejected, decode_image, to_model_input, to_png
from services.common.jobs import (
    EditJob,
    JobError,
    JobNotFound,
    JobStatus,
    JobStore,
    Progress,
    TransitionRefused,
    batch_key,
    output_key,
    utcnow,
)
from services.common.logging import bind_request_id
from services.common.storage import ObjectNotFound, Storage, StorageError
from services.gpu_worker.engine import EditEngine, EditRequest

log = logging.getLogger(__name__)

CLAIMABLE = frozenset({JobStatus.queued, JobStatus.running})
RUNNING = frozenset({JobStatus.running})


class JobCanceled(Exception):
    pass


@dataclass
class JobFailure(Exception):
    code: str
    message: str


@dataclass(frozen=True)
class Deferred:
    """The job is held by another live worker; look again after `seconds`."""

    seconds: float


@dataclass
class _Loaded:
    job: EditJob
    request: EditRequest


class EditRunner:
    def __init__(
        self,
        engine: EditEngine | None,
        jobs: JobStore,
        storage: Storage,
        max_side: int,
        max_batch: int = 1,
        batch_window_ms: int = 0,
        lease_s: float = 60.0,
        engine_error: str | None = None,
        observer=None,
    ) -> None:
        self.engine = engine
        self.jobs = jobs
        self.storage = storage
        self.max_side = max_side
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
        self.jobs.remove_pending(job.batch_key, job.id)
        with bind_request_id(job.request_id, job.id):
            batch = [job, *self._gather(job)]
            return self.run(batch)

    # -- claiming ----------------------------------------------------------------------

    def _claim(self, job_id: str) -> EditJob:
        now = utcnow()

        def free(job: EditJob) -> bool:
            # Queued, or running under a lapsed lease (its worker died).
            return job.status == JobStatus.queued or (
                job.lease_expires_at is not None and job.lease_expires_at <= now
            )

        total = self.jobs.get(job_id).params.num_inference_steps
        job = self.jobs.transition(
            job_id,
            CLAIMABLE,
            when=free,
            status=JobStatus.running,
            started_at=now,
            lease_expires_at=now + self.lease,
            progress=Progress(step=0, total=total),
            output_keys=[],
            error=None,
        )
        if self.observer:
            self.observer.job_started(job)
        return job

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
                with contextlib.suppress(TransitionRefused, JobNotFound):
                    joined.append(self._claim_queued(job_id))
                # Claimed or not claimable: either way it no longer waits here.
                self.jobs.remove_pending(first.batch_key, job_id)
            if len(joined) >= self.max_batch - 1 or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        if joined:
            log.info("job %s runs in a batch with %s", first.id, [j.id for j in joined])
        return joined

    def _claim_queued(self, job_id: str) -> EditJob:
        now = utcnow()
        total = self.jobs.get(job_id).params.num_inference_steps
        job = self.jobs.transition(
            job_id,
            {JobStatus.queued},
            status=JobStatus.running,
            started_at=now,
            lease_expires_at=now + self.lease,
            progress=Progress(step=0, total=total),
        )
        if self.observer:
            self.observer.job_started(job)
        return job

    # -- running -----------------------------------------------------------------------

    def run(self, batch: list[EditJob]) -> dict[str, JobStatus]:
        results: dict[str, JobStatus] = {}
        groups: dict[str, list[_Loaded]] = {}
        for job in batch:
            try:
                loaded = self._load(job)
            except JobFailure as failure:
                results[job.id] = self._fail(job, failure.code, failure.message)
                continue
            key = batch_key(loaded.request.image.size, job.params)
            groups.setdefault(key, []).append(loaded)
        # Jobs normally share one key; a worker with another MAX_SIDE than the API's
        # would see other sizes, so group by what the engine really gets.
        for group in groups.values():
            results.update(self._run_group(group))
        return results

    def _load(self, job: EditJob) -> _Loaded:
        if self.engine is None:
            raise JobFailure("model_unavailable", self.engine_error or "the model is not loaded")
        try:
            raw = self.storage.get(job.input_key)
        except ObjectNotFound:
            raise JobFailure(
                "input_missing", f"the input image {job.input_key} is not in storage"
            ) from None
        except StorageError as exc:
            raise JobFailure("storage_error", f"could not read the input image: {exc}") from None
        try:
            image = to_model_input(decode_image(raw).image, self.max_side)
        except ImageRejected as exc:
            raise JobFailure(
                "input_invalid", f"the stored input image is unusable: {exc.message}"
            ) from None
        return _Loaded(job, EditRequest(image, job.params, self._progress_reporter(job)))

    def _progress_reporter(self, job: EditJob):
        def on_step(step: int, total: int) -> None:
            try:
                self.jobs.transition(
                    job.id,
                    RUNNING,
                    progress=Progress(step=step, total=total),
                    lease_expires_at=utcnow() + self.lease,
                )
            except TransitionRefused:
                # The API marked the job canceled: it leaves the batch before the next step.
                raise JobCanceled from None

        return on_step

    def _run_group(self, group: list[_Loaded]) -> dict[str, JobStatus]:
        started = time.perf_counter()
        try:
            outcomes = self.engine.predict_batch([item.request for item in group])
        except SoftTimeLimitExceeded:
            return self._fail_all(group, "timeout", "the edit took longer than the time limit")
        except Exception as exc:
            if _is_out_of_memory(exc):
                _release_gpu_memory()
                return self._fail_all(
                    group,
                    "out_of_memory",
                    "the GPU ran out of memory; try a smaller image or fewer outputs",
                )
            log.exception("batch %s failed", [item.job.id for item in group])
            return self._fail_all(group, "internal_error", f"{type(exc).__name__}: {exc}")
        engine_s = time.perf_counter() - started
        results = {}
        for item, outcome in zip(group, outcomes, strict=True):
            results[item.job.id] = self._finish(item.job, outcome, engine_s)
        return results

    def _finish(self, job: EditJob, outcome, engine_s: float) -> JobStatus | None:
        with bind_request_id(job.request_id, job.id):
            return self._record_outcome(job, outcome, engine_s)

    def _record_outcome(self, job: EditJob, outcome, engine_s: float) -> JobStatus | None:
        if isinstance(outcome, JobCanceled):
            log.info("job %s was canceled while running", job.id)
            return JobStatus.canceled
        if isinstance(outcome, BaseException):
            return self._fail(job, "internal_error", f"{type(outcome).__name__}: {outcome}")
        try:
            keys = []
            for index, image in enumerate(outcome):
                key = output_key(job.id, index)
                self.storage.put(key, to_png(image), "image/png")
                keys.append(key)
        except StorageError as exc:
            return self._fail(job, "storage_error", f"could not store the outputs: {exc}")
        try:
            done = self.jobs.transition(
                job.id,
                RUNNING,
                status=JobStatus.succeeded,
                output_keys=keys,
                finished_at=utcnow(),
                lease_expires_at=None,
            )
        except TransitionRefused:
            log.info("job %s was canceled as it finished", job.id)
            return JobStatus.canceled
        log.info("job %s succeeded (batch engine time %.2fs)", job.id, engine_s)
        if self.observer:
            self.observer.job_finished(done, engine_s)
        return JobStatus.succeeded

    def _fail_all(self, group: list[_Loaded], code: str, message: str) -> dict[str, JobStatus]:
        return {item.job.id: self._fail(item.job, code, message) for item in group}

    def _fail(self, job: EditJob, code: str, message: str) -> JobStatus | None:
        with bind_request_id(job.request_id, job.id):
            log.warning("job %s failed: %s: %s", job.id, code, message)
        try:
            failed = self.jobs.transition(
                job.id,
                RUNNING,
                status=JobStatus.failed,
                error=JobError(code=code, message=message),
                finished_at=utcnow(),
                lease_expires_at=None,
            )
        except (TransitionRefused, JobNotFound):
            return None
        if self.observer:
            self.observer.job_finished(failed, 0.0)
        return JobStatus.failed


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _release_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
