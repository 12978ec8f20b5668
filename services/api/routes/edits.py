"""/v1/edits: submit, inspect, download and cancel edit jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import (
    APIRouter,
    Depends,
    File,
    Form,
    Header,
    Query,
    Request,
    Response,
    UploadFile,
    status,
)
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from services.api.deps import AsyncRedisDep, CeleryDep, JobStoreDep, SettingsDep, StorageDep
from services.api.errors import APIError, ErrorResponse
from services.api.events import HEARTBEAT_S, job_events, wait_finished
from services.api.metrics import JOBS_SUBMITTED
from services.api.schemas import EditJobResponse
from services.api.submission import submit_job
from services.api.uploads import check_image, check_mask, read_limited, reject_duplicate_fields
from services.common.buckets import DEFAULT_RESOLUTION, bucket_for
from services.common.edit_params import EditParams
from services.common.images import OUTPUT_FORMATS, upright_size
from services.common.jobs import FINISHED, EditJob, JobNotFound, JobStatus, TransitionRefused
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
            # From the configured base, never from the request's Host header.
            base = settings.public_base_url.rstrip("/")
            url = f"{base}/v1/edits/{job.id}/outputs/{index}"
        urls.append(url)
    return urls


def _respond(job, request, storage, settings) -> EditJobResponse:
    # A queued job says where it stands in the queue (reads only, never for other states).
    position, wait_s = request.app.state.jobs.queue_position(job)
    urls = _output_urls(job, request, storage, settings)
    return EditJobResponse.from_job(job, urls, position, wait_s)


@router.post(
    "",
    dependencies=[Depends(reject_duplicate_fields)],
    status_code=status.HTTP_202_ACCEPTED,
    response_model=EditJobResponse,
    responses={
        200: {"model": EditJobResponse, "description": "With `wait`: the job finished in time"},
        **_ERRORS,
    },
    summary="Submit an edit job",
)
async def submit_edit(
    request: Request,
    response: Response,
    settings: SettingsDep,
    jobs: JobStoreDep,
    storage: StorageDep,
    celery: CeleryDep,
    async_redis: AsyncRedisDep,
    image: Annotated[
        UploadFile, File(description="Product photo: JPEG, PNG, WebP, HEIC/HEIF or AVIF")
    ],
    # Every other form field, with its bounds, default and description, is a field of
    # EditParams: FastAPI reads the model as the form and validates it (422 invalid_<field>).
    params: Annotated[EditParams, Form()],
    mask: Annotated[
        UploadFile | None,
        File(
            description="Where the edit may change the photo: white may change, black is "
            "kept exactly (PNG or JPEG, any size; resized to the photo)"
        ),
    ] = None,
    wait: Annotated[
        float | None,
        Query(
            gt=0,
            le=60,
            description="Hold the request until the job finishes, for at most this many "
            "seconds: 200 with the finished job, or 202 with the job as it then stands "
            "(422 invalid_wait outside 0 < wait <= 60)",
        ),
    ] = None,
) -> EditJobResponse:
    # Reading, checking and storing the upload blocks: off the event loop. Waiting does not.
    args = (request, settings, jobs, storage, celery, image, params, mask)
    job = await run_in_threadpool(_accept, *args)
    JOBS_SUBMITTED.inc()
    response.headers["Location"] = f"/v1/edits/{job.id}"
    if wait is not None:
        job = await wait_finished(async_redis, jobs, job, wait)
        if job.status in FINISHED:
            response.status_code = status.HTTP_200_OK
    return await run_in_threadpool(_respond, job, request, storage, settings)


def _accept(request, settings, jobs, storage, celery, image, params, mask) -> EditJob:
    """The job accepted: uploads read and checked, input stored, record created, queued."""
    data = read_limited(image, settings.max_upload_bytes)
    decoded = check_image(data)
    size = upright_size(decoded.image)
    mask_data = None
    if mask is not None:
        mask_data = read_limited(mask, settings.max_upload_bytes, "the mask")
        check_mask(mask_data, size, params.mask_invert)

    # The bucket the model will run at keys the batching index; the mask does not: masked
    # and unmasked jobs share UNet calls.
    bucket = bucket_for(*size, settings.resolution or DEFAULT_RESOLUTION)
    job = EditJob.new(
        params, decoded.content_type, request.state.request_id, bucket, mask_data is not None
    )
    return submit_job(job, data, jobs, storage, celery, mask_data)


@router.get("/{job_id}", response_model=EditJobResponse, responses=_ERRORS, summary="Get a job")
def get_edit(
    job_id: str, request: Request, jobs: JobStoreDep, storage: StorageDep, settings: SettingsDep
) -> EditJobResponse:
    return _respond(_load(jobs, job_id), request, storage, settings)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Server-sent events: `status`, `progress`, `queue_position`, then "
            "`completed`, `failed` or `canceled` with the finished job (as `GET "
            "/v1/edits/{id}` returns it), after which the stream ends. Every change carries "
            "an id; reconnecting with `Last-Event-ID` resumes from the current state.",
        },
        204: {"description": "The job ended, and the client already saw its final event"},
        **_ERRORS,
    },
    summary="Follow a job as it happens",
)
async def edit_events(
    job_id: str,
    request: Request,
    jobs: JobStoreDep,
    storage: StorageDep,
    settings: SettingsDep,
    async_redis: AsyncRedisDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    job = await run_in_threadpool(_load, jobs, job_id)

    def render(finished: EditJob) -> EditJobResponse:
        return _respond(finished, request, storage, settings)

    events = job_events(async_redis, jobs, job, last_event_id, render)
    if job.status in FINISHED and last_event_id is not None:
        # A client that saw the end reconnects (as EventSource does): 204 stops it.
        first = await anext(events, None)
        if first is None:
            return Response(status_code=status.HTTP_204_NO_CONTENT)
        return EventSourceResponse(_prepend(first, events), ping=HEARTBEAT_S)
    return EventSourceResponse(events, ping=HEARTBEAT_S)


async def _prepend(first, rest):
    yield first
    async for item in rest:
        yield item


@router.get(
    "/{job_id}/outputs/{index}",
    response_class=Response,
    responses={
        200: {"content": {fmt.content_type: {} for fmt in OUTPUT_FORMATS.values()}},
        **_ERRORS,
    },
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
    fmt = OUTPUT_FORMATS[job.params.output_format]
    filename = f"{job_id}-{index}.{fmt.extension}"
    return Response(
        data,
        media_type=fmt.content_type,
        headers={"Content-Disposition": f'inline; filename="{filename}"'},
    )


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
