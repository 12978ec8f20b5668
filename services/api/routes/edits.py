"""/v1/edits: submit, inspect, download and cancel edit jobs."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, Response, UploadFile, status
from pydantic import ValidationError

from services.api.deps import CeleryDep, JobStoreDep, SettingsDep, StorageDep
from services.api.errors import APIError, ErrorResponse
from services.api.metrics import JOBS_SUBMITTED
from services.api.schemas import EditJobResponse
from services.api.uploads import check_image, read_limited
from services.common.images import model_input_size, upright_size
from services.common.jobs import (
    FINISHED,
    EditJob,
    EditParams,
    JobError,
    JobNotFound,
    JobStatus,
    TransitionRefused,
    utcnow,
)
from services.common.queues import EDIT_TASK, EDITS_QUEUE
from services.common.storage import ObjectNotFound, StorageError

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
    try:
        storage.put(job.input_key, data, decoded.content_type)
    except StorageError as exc:
        log.error("storing input of job %s failed: %s", job.id, exc)
        raise APIError(
            503, "storage_unavailable", "the image could not be stored; retry later"
        ) from None
    jobs.create(job)
    jobs.add_pending(job)
    try:
        # Only the id travels through the broker; the worker reads everything else.
        celery.send_task(EDIT_TASK, args=[job.id], queue=EDITS_QUEUE, task_id=job.id)
    except Exception as exc:
        log.error("enqueueing job %s failed: %s", job.id, exc)
        jobs.transition(
            job.id,
            {JobStatus.queued},
            status=JobStatus.failed,
            error=JobError(code="enqueue_failed", message="the job could not be queued"),
            finished_at=utcnow(),
        )
        raise APIError(
            503, "queue_unavailable", "the job could not be queued; retry later"
        ) from None

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
        assert refused.job.status in FINISHED
        raise APIError(
            409, "job_finished", f"job {job_id} already ended as {refused.job.status}"
        ) from None
    except JobNotFound:
        raise APIError(404, "job_not_found", f"no edit job with id {job_id!r}") from None
    jobs.remove_pending(job.batch_key, job.id)
    return _respond(job, request, storage, settings)
