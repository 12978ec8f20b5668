"""/v1/edits: submit, inspect, download and cancel edit jobs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated

import redis
from celery import Celery
from fastapi import APIRouter, File, Form, Request, Response, UploadFile, status
from pydantic import ValidationError

from services.api.deps import CeleryDep, JobStoreDep, SettingsDep, StorageDep
from services.api.errors import (
    APIError,
    ErrorResponse,
    job_store_unavailable,
    queue_unavailable,
)
from services.api.metrics import JOBS_SUBMITTED
from services.api.schemas import EditJobResponse
from services.api.uploads import check_image, read_limited
from services.common.images import model_input_size, upright_size
from services.common.jobs import (
    EditJob,
    EditParams,
    JobError,
    JobNotFound,
    JobStatus,
    JobStore,
    TransitionRefused,
    utcnow,
)
from services.common.queues import enqueue_edit
from services.common.storage import ObjectNotFound, Storage

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/edits", tags=["edits"])

_ERRORS = {code: {"model": ErrorResponse} for code in (404, 409, 413, 415, 422, 503)}


def _load(jobs: JobStoreDep, job_id: str) -> EditJob:
    try:
        return jobs.get(job_id)
    except JobNotFound:
        raise APIError(404, "job_not_found", f"no edit job with id {job_id!r}") from None


def _output_urls(job: EditJob, request: Request, storage: StorageDep, settings: SettingsDep):
    urls = []
    for index, key in enumerate(job.output_keys):
        url = storage.presigned_url(key, settings.presigned_url_expiry_s)
        if url is None:
            base = settings.public_base_url or str(request.base_url)
            url = f"{base.rstrip('/')}/v1/edits/{job.id}/outputs/{index}"
        urls.append(url)
    return urls


def _respond(job, request, storage, settings) -> EditJobResponse:
    return EditJobResponse.from_job(job, _output_urls(job, request, storage, settings))


def _accept(job: EditJob, data: bytes, jobs: JobStore, storage: Storage, celery: Celery) -> EditJob:
    """Store the input, record the job, index it as pending and queue it; the job as it
    now stands.

    A failing step undoes what the ones before it did, so that a client told 503 leaves
    behind neither an input no job points at nor a job that may still run (unless Redis
    fails for the undoing too).
    """
    # Nothing to undo yet if this fails: the StorageError handler answers 503.
    storage.put(job.input_key, data, job.input_content_type)
    try:
        jobs.create(job)
    except redis.RedisError as exc:
        log.error("recording job %s failed: %r", job.id, exc)
        # A write that timed out may still have landed; the record must not outlive its input.
        _quietly(f"deleting record of job {job.id}", jobs.delete, job.id)
        _quietly(f"deleting input of job {job.id}", storage.delete, job.input_key)
        raise job_store_unavailable() from None
    try:
        jobs.add_pending(job)
        enqueue_edit(celery, job.id)
    except Exception as exc:
        log.error("enqueueing job %s failed: %r", job.id, exc)
        return _fail_unqueued(job, jobs)
    return job


def _fail_unqueued(job: EditJob, jobs: JobStore) -> EditJob:
    """End a job whose queueing failed, unless a worker got to it anyway.

    Workers also gather queued jobs from the pending index, so the job may already be
    running with another job's message: then it is accepted after all.
    """
    try:
        failed = jobs.transition(
            job.id,
            {JobStatus.queued},
            status=JobStatus.failed,
            error=JobError(code="enqueue_failed", message="the job could not be queued"),
            finished_at=utcnow(),
        )
    except TransitionRefused as refused:
        log.info("job %s was taken by a worker although queueing it failed", job.id)
        return refused.job
    except (JobNotFound, redis.RedisError) as exc:
        # Redis is gone too, so nothing more can be undone from here.
        log.error("marking unqueued job %s failed did not work: %r", job.id, exc)
        raise queue_unavailable() from None
    _quietly(
        f"removing pending entry of job {job.id}", jobs.remove_pending, failed.batch_key, job.id
    )
    raise queue_unavailable()


def _quietly(what: str, fn: Callable[..., object], *args: object) -> None:
    """Best-effort cleanup on a path that already failed: its own failure is only logged."""
    try:
        fn(*args)
    except Exception as exc:
        log.error("%s failed: %r", what, exc)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=EditJobResponse,
    responses=_ERRORS,
    summary="Submit an edit job",
)
def submit_edit(
    request: Request,
    response: Response,
    settings: SettingsDep,
    jobs: JobStoreDep,
    storage: StorageDep,
    celery: CeleryDep,
    image: Annotated[UploadFile, File(description="Product photo: JPEG, PNG or WebP")],
    prompt: Annotated[str, Form(description="The edit instruction")],
    num_inference_steps: Annotated[int, Form()] = 20,
    guidance_scale: Annotated[float, Form(description="Text guidance S_T")] = 7.5,
    image_guidance_scale: Annotated[float, Form(description="Image guidance S_I")] = 1.5,
    seed: Annotated[int | None, Form(description="Random when absent")] = None,
    num_outputs: Annotated[int, Form()] = 1,
    negative_prompt: Annotated[str | None, Form()] = None,
) -> EditJobResponse:
    prompt = prompt.strip()
    negative_prompt = (negative_prompt or "").strip() or None
    fields = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "image_guidance_scale": image_guidance_scale,
        "num_outputs": num_outputs,
    }
    if seed is not None:
        fields["seed"] = seed
    try:
        params = EditParams(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise APIError(422, f"invalid_{field}", f"{field}: {err['msg']}") from None

    data = read_limited(image, settings.max_upload_bytes)
    decoded = check_image(data)

    size = model_input_size(*upright_size(decoded.image), settings.max_side)
    job = EditJob.new(params, decoded.content_type, request.state.request_id, size)
    job = _accept(job, data, jobs, storage, celery)
    JOBS_SUBMITTED.inc()
    response.headers["Location"] = f"/v1/edits/{job.id}"
    return _respond(job, request, storage, settings)


@router.get("/{job_id}", response_model=EditJobResponse, responses=_ERRORS, summary="Get a job")
def get_edit(
    job_id: str, request: Request, jobs: JobStoreDep, storage: StorageDep, settings: SettingsDep
) -> EditJobResponse:
    return _respond(_load(jobs, job_id), request, storage, settings)


@router.get(
    "/{job_id}/outputs/{index}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **_ERRORS},
    summary="Download an output image",
)
def get_output(job_id: str, index: int, jobs: JobStoreDep, storage: StorageDep) -> Response:
    job = _load(jobs, job_id)
    if job.status != JobStatus.succeeded:
        raise APIError(409, "job_not_succeeded", f"job {job_id} is {job.status}; it has no outputs")
    if not 0 <= index < len(job.output_keys):
        raise APIError(
            404, "output_not_found", f"job {job_id} has outputs 0..{len(job.output_keys) - 1}"
        )
    try:
        data = storage.get(job.output_keys[index])
    except ObjectNotFound:
        raise APIError(404, "output_not_found", f"output {index} of job {job_id} is gone") from None
    return Response(data, media_type="image/png")


@router.post(
    "/{job_id}/cancel", response_model=EditJobResponse, responses=_ERRORS, summary="Cancel a job"
)
def cancel_edit(
    job_id: str, request: Request, jobs: JobStoreDep, storage: StorageDep, settings: SettingsDep
) -> EditJobResponse:
    _load(jobs, job_id)
    try:
        # A queued job is skipped when a worker takes it; a running one stops at its next
        # denoising step, when the worker sees this status.
        job = jobs.transition(
            job_id,
            {JobStatus.queued, JobStatus.running},
            status=JobStatus.canceled,
            finished_at=utcnow(),
        )
    except TransitionRefused as refused:
        if refused.job.status != JobStatus.canceled:
            raise APIError(
                409, "job_finished", f"job {job_id} already ended as {refused.job.status}"
            ) from None
        # Canceling twice is not an error (a retried request, two clients): the job is
        # in the state asked for.
        job = refused.job
    except JobNotFound:
        raise APIError(404, "job_not_found", f"no edit job with id {job_id!r}") from None
    jobs.remove_pending(job.batch_key, job.id)
    return _respond(job, request, storage, settings)
