"""One edit job from record to result: read the input, run the engine, store the outputs.

Every way a job can end is decided here, so that no job is ever left `running`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

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
    output_key,
    utcnow,
)
from services.common.storage import ObjectNotFound, Storage, StorageError
from services.gpu_worker.engine import EditEngine

log = logging.getLogger(__name__)

RUNNABLE = frozenset({JobStatus.queued, JobStatus.running})
RUNNING = frozenset({JobStatus.running})


class JobCanceled(Exception):
    pass


@dataclass
class JobFailure(Exception):
    code: str
    message: str


def run_edit_job(
    job_id: str,
    engine: EditEngine | None,
    jobs: JobStore,
    storage: Storage,
    max_side: int,
    engine_error: str | None = None,
) -> JobStatus | None:
    """Run job `job_id` to an end state and return it; None when there was nothing to run.

    Idempotent: a job already finished or canceled is left alone, and a job found
    `running` (its worker died and the broker redelivered it) is run again from scratch.
    """
    try:
        total = jobs.get(job_id).params.num_inference_steps
        job = jobs.transition(
            job_id,
            RUNNABLE,
            status=JobStatus.running,
            started_at=utcnow(),
            progress=Progress(step=0, total=total),
            output_keys=[],
            error=None,
        )
    except JobNotFound:
        log.warning("job %s has no record (expired or never created); dropping it", job_id)
        return None
    except TransitionRefused as refused:
        log.info("job %s is %s; not running it", job_id, refused.job.status)
        return None

    started = time.perf_counter()
    try:
        if engine is None:
            raise JobFailure("model_unavailable", engine_error or "the model is not loaded")
        outputs = _edit(job, engine, jobs, storage, max_side)
        keys = []
        for index, image in enumerate(outputs):
            key = output_key(job_id, index)
            storage.put(key, to_png(image), "image/png")
            keys.append(key)
        jobs.transition(
            job_id,
            RUNNING,
            status=JobStatus.succeeded,
            output_keys=keys,
            finished_at=utcnow(),
        )
        log.info("job %s succeeded in %.2fs", job_id, time.perf_counter() - started)
        return JobStatus.succeeded
    except (JobCanceled, TransitionRefused):
        log.info("job %s was canceled while running", job_id)
        return JobStatus.canceled
    except JobFailure as failure:
        return _fail(jobs, job_id, failure.code, failure.message)
    except SoftTimeLimitExceeded:
        return _fail(jobs, job_id, "timeout", "the edit took longer than the worker's time limit")
    except Exception as exc:
        if _is_out_of_memory(exc):
            _release_gpu_memory()
            return _fail(
                jobs,
                job_id,
                "out_of_memory",
                "the GPU ran out of memory; try a smaller image or fewer outputs",
            )
        log.exception("job %s failed", job_id)
        return _fail(jobs, job_id, "internal_error", f"{type(exc).__name__}: {exc}")


def _edit(job: EditJob, engine: EditEngine, jobs: JobStore, storage: Storage, max_side: int):
    try:
        raw = storage.get(job.input_key)
    except ObjectNotFound:
        raise JobFailure(
            "input_missing", f"the input image {job.input_key} is not in storage"
        ) from None
    except StorageError as exc:
        raise JobFailure("storage_error", f"could not read the input image: {exc}") from None
    try:
        image = to_model_input(decode_image(raw).image, max_side)
    except ImageRejected as exc:
        raise JobFailure(
            "input_invalid", f"the stored input image is unusable: {exc.message}"
        ) from None

    def on_step(step: int, total: int) -> None:
        try:
            jobs.transition(job.id, RUNNING, progress=Progress(step=step, total=total))
        except TransitionRefused:
            # The API marked the job canceled: stop before the next denoising step.
            raise JobCanceled from None

    return engine.predict(image, job.params, on_step=on_step)


def _fail(jobs: JobStore, job_id: str, code: str, message: str) -> JobStatus | None:
    log.warning("job %s failed: %s: %s", job_id, code, message)
    try:
        jobs.transition(
            job_id,
            RUNNING,
            status=JobStatus.failed,
            error=JobError(code=code, message=message),
            finished_at=utcnow(),
        )
    except (TransitionRefused, JobNotFound):
        return None
    return JobStatus.failed


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _release_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
