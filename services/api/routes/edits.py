"""/v1/edits: submit, inspect, download and cancel edit jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, Response, UploadFile, status

from services.api.deps import CeleryDep, JobStoreDep, SettingsDep, StorageDep
from services.api.errors import APIError, ErrorResponse
from services.api.metrics import JOBS_SUBMITTED
from services.api.schemas import EditJobResponse
from services.api.submission import submit_job
from services.api.uploads import check_image, read_limited
from services.common.edit_params import EditParams
from services.common.images import model_input_size, upright_size
from services.common.jobs import EditJob, JobNotFound, JobStatus, TransitionRefused
from services.common.storage import ObjectNotFound

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
    # Every other form field, with its bounds, default and description, is a field of
    # EditParams: FastAPI reads the model as the form and validates it (422 invalid_<field>).
    params: Annotated[EditParams, Form()],
) -> EditJobResponse:
    data = read_limited(image, settings.max_upload_bytes)
    decoded = check_image(data)

    size = model_input_size(*upright_size(decoded.image), settings.max_side)
    job = EditJob.new(params, decoded.content_type, request.state.request_id, size)
    job = submit_job(job, data, jobs, storage, celery)
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
    try:
        job = jobs.cancel(job_id)
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
    return _respond(job, request, storage, settings)
