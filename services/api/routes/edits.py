"""/v1/edits: submit, list, inspect, follow, download, cancel and delete edit jobs.

Every route acts for the caller's key (services/api/auth.py): a job of another key is
404, exactly as a job that does not exist.
"""

from __future__ import annotations

import hashlib
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

from services.api.auth import CallerDep, OptionalCallerDep, unauthorized
from services.api.deps import (
    AsyncRedisDep,
    CeleryDep,
    IdempotencyDep,
    JobStoreDep,
    JobViewDep,
    LimitsDep,
    SettingsDep,
    StorageDep,
)
from services.api.errors import APIError, ErrorResponse
from services.api.events import HEARTBEAT_S, job_events, wait_finished
from services.api.idempotency import IdempotencyKey, fingerprint
from services.api.job_view import output_path
from services.api.limits import queue_full, too_many_unfinished
from services.api.metrics import JOBS_SUBMITTED
from services.api.schemas import EditForm, EditJobList, EditJobResponse
from services.api.submission import submit_job
from services.api.uploads import check_image, check_mask, read_limited, reject_duplicate_fields
from services.common.adapters import AdapterStore
from services.common.buckets import DEFAULT_RESOLUTION, bucket_for
from services.common.images import OUTPUT_FORMATS, upright_size
from services.common.job_cleanup import delete_job
from services.common.jobs import (
    FINISHED,
    EditJob,
    JobNotFound,
    JobStatus,
    SubmissionRefused,
    TransitionRefused,
    new_job_id,
)
from services.common.listing import MAX_PAGE, BadCursor
from services.common.storage import ObjectNotFound
from services.common.webhook_delivery import WebhookURLRefused, check_webhook_url
from services.common.webhooks import WebhookEvent

router = APIRouter(prefix="/v1/edits", tags=["edits"])

_ERROR_CODES = {
    400: "A malformed request (cut multipart body)",
    401: "No API key, or one that is not valid (`WWW-Authenticate` says how to send one)",
    404: "No such job for this key",
    408: "The request body did not arrive in time",
    409: "The job is not in a state that allows this",
    413: "An upload over the size or pixel limit",
    415: "An image format that is not supported",
    422: "A parameter out of bounds, an image that cannot be used, a bad cursor",
    429: "Rate limit or unfinished-job cap reached (`Retry-After` says when to retry)",
    503: "The queue is full or a dependency is down (`Retry-After` where known)",
}


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorResponse, "description": _ERROR_CODES[code]} for code in codes}


_READ_ERRORS = _errors(401, 404, 422, 503)


def _load(jobs: JobStoreDep, job_id: str, caller_key: str) -> EditJob:
    try:
        job = jobs.get(job_id)
    except JobNotFound:
        job = None
    if job is None or job.owner != caller_key:
        raise APIError(404, "job_not_found", f"no edit job with id {job_id!r}")
    return job


@router.post(
    "",
    dependencies=[Depends(reject_duplicate_fields)],
    status_code=status.HTTP_202_ACCEPTED,
    response_model=EditJobResponse,
    responses={
        202: {
            "description": "Accepted: the job is queued",
            "headers": {
                "Location": {
                    "description": "The job's URL (`GET` it, or follow `/events`)",
                    "schema": {"type": "string"},
                }
            },
        },
        200: {
            "model": EditJobResponse,
            "description": "With `wait`: the job finished in time; with an `Idempotency-Key` "
            "already used for the same request: the job that request created",
        },
        **_errors(400, 401, 408, 409, 413, 415, 422, 429, 503),
    },
    summary="Submit an edit job",
)
async def submit_edit(
    request: Request,
    response: Response,
    caller: CallerDep,
    settings: SettingsDep,
    jobs: JobStoreDep,
    storage: StorageDep,
    celery: CeleryDep,
    view: JobViewDep,
    limits: LimitsDep,
    idempotency: IdempotencyDep,
    async_redis: AsyncRedisDep,
    image: Annotated[
        UploadFile, File(description="Product photo: JPEG, PNG, WebP, HEIC/HEIF or AVIF")
    ],
    # Every other form field, with its bounds, default and description, is a field of
    # EditParams (or, for webhooks, of EditForm): FastAPI reads the model as the form and
    # validates it (422 invalid_<field>).
    form: Annotated[EditForm, Form()],
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
    idempotency_key: IdempotencyKey = None,
) -> EditJobResponse:
    # The fields as sent (not as validated: an absent seed is drawn anew each time).
    sent = [(k, v) for k, v in (await request.form()).multi_items() if isinstance(v, str)]
    accept = _Acceptance(request, caller.key_id, settings, jobs, storage, celery, limits)
    # Reading, checking and storing the upload blocks: off the event loop. Waiting does not.
    job, replayed = await run_in_threadpool(
        accept.run, image, form, mask, idempotency, idempotency_key, sent
    )
    response.headers["Location"] = f"/v1/edits/{job.id}"
    if replayed:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    else:
        JOBS_SUBMITTED.inc()
    if wait is not None and job.status not in FINISHED:
        job = await wait_finished(async_redis, jobs, job, wait)
    if wait is not None and job.status in FINISHED:
        response.status_code = status.HTTP_200_OK
    return await run_in_threadpool(view.render, job)


class _Acceptance:
    """One submission, from uploads to a queued job."""

    def __init__(self, request, owner, settings, jobs, storage, celery, limits) -> None:
        self.request_id = request.state.request_id
        self.redis = request.app.state.redis
        self.owner = owner
        self.settings = settings
        self.jobs = jobs
        self.storage = storage
        self.celery = celery
        self.limits = limits

    def run(self, image, form, mask, idempotency, idempotency_key, sent):
        data = read_limited(image, self.settings.max_upload_bytes)
        mask_data = None
        if mask is not None:
            mask_data = read_limited(mask, self.settings.max_upload_bytes, "the mask")
        if idempotency_key is None:
            return self._accept(new_job_id(), data, form, mask_data), False
        files = [("image", data)] + ([("mask", mask_data)] if mask_data is not None else [])
        request_fingerprint = fingerprint("/v1/edits", sent + files)
        return idempotency.run_once(
            self.owner,
            idempotency_key,
            request_fingerprint,
            new_job_id(),
            lambda job_id: self._accept(job_id, data, form, mask_data),
            self._find,
        )

    def _find(self, job_id: str) -> EditJob | None:
        try:
            return self.jobs.get(job_id)
        except JobNotFound:
            return None

    def _accept(self, job_id: str, data: bytes, form: EditForm, mask_data: bytes | None):
        """The job accepted: limits kept, uploads checked, input stored, record created,
        queued."""
        # A full queue first: a client told to retry later has not used up its rate.
        self.limits.check_backlog(self.jobs)
        self.limits.hit(self.owner)
        params, webhook = form.split()
        if params.adapter is not None:
            # Unknown and another key's adapters alike: nothing says which it was.
            adapter = AdapterStore(self.redis).get(params.adapter)
            if adapter is None or not adapter.visible_to(self.owner):
                raise APIError(
                    422, "invalid_adapter", f"no adapter with id {params.adapter!r}"
                ) from None
        if webhook is not None:
            try:
                check_webhook_url(webhook.url, self.settings.webhook_allowed_hosts)
            except WebhookURLRefused as refused:
                raise APIError(422, "invalid_webhook_url", str(refused)) from None
        decoded = check_image(data)
        size = upright_size(decoded.image)
        if mask_data is not None:
            check_mask(mask_data, size, params.mask_invert)
        # The bucket the model will run at keys the batching index; the mask does not:
        # masked and unmasked jobs share UNet calls.
        bucket = bucket_for(*size, self.settings.resolution or DEFAULT_RESOLUTION)
        job = EditJob.new(
            params,
            decoded.content_type,
            self.request_id,
            bucket,
            mask_data is not None,
            owner=self.owner,
            webhook=webhook,
            job_id=job_id,
        )
        try:
            return submit_job(job, data, self.jobs, self.storage, self.celery, mask_data)
        except SubmissionRefused as refused:
            if refused.reason == "queue_full":
                raise queue_full() from None
            raise too_many_unfinished(self.settings) from None


@router.get(
    "",
    response_model=EditJobList,
    responses=_errors(401, 422, 503),
    summary="List your jobs, newest first",
)
def list_edits(
    caller: CallerDep,
    jobs: JobStoreDep,
    view: JobViewDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Jobs per page")] = 20,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the page before")
    ] = None,
    status_filter: Annotated[
        JobStatus | None, Query(alias="status", description="Only jobs in this state")
    ] = None,
) -> EditJobList:
    try:
        found, next_cursor = jobs.owned(caller.key_id, limit, cursor, status_filter)
    except BadCursor as bad:
        raise APIError(422, "invalid_cursor", str(bad)) from None
    return EditJobList(data=[view.render(job) for job in found], next_cursor=next_cursor)


@router.get(
    "/{job_id}", response_model=EditJobResponse, responses=_READ_ERRORS, summary="Get a job"
)
def get_edit(
    job_id: str, caller: CallerDep, jobs: JobStoreDep, view: JobViewDep
) -> EditJobResponse:
    return view.render(_load(jobs, job_id, caller.key_id))


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
        **_READ_ERRORS,
    },
    summary="Follow a job as it happens",
)
async def edit_events(
    job_id: str,
    caller: CallerDep,
    jobs: JobStoreDep,
    view: JobViewDep,
    async_redis: AsyncRedisDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    job = await run_in_threadpool(_load, jobs, job_id, caller.key_id)
    events = job_events(async_redis, jobs, job, last_event_id, view.render)
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
        **_errors(401, 404, 409, 422, 503),
    },
    summary="Download an output image",
    description="With the `expires` and `signature` of an output URL from the job, no key is "
    "needed until it expires; without them, the job's key is.",
)
def get_output(
    job_id: str,
    index: int,
    request: Request,
    caller: OptionalCallerDep,
    jobs: JobStoreDep,
    storage: StorageDep,
    view: JobViewDep,
    expires: Annotated[int | None, Query(description="From the signed output URL")] = None,
    signature: Annotated[
        str | None, Query(max_length=128, description="From the signed output URL")
    ] = None,
) -> Response:
    if view.signer.verify(output_path(job_id, index), expires, signature):
        try:
            job = jobs.get(job_id)
        except JobNotFound:
            raise APIError(404, "job_not_found", f"no edit job with id {job_id!r}") from None
    elif caller is None:
        what = "the output URL expired" if signature else "an API key is required"
        raise unauthorized(f"{what}: get a fresh URL from the job, or send the job's API key")
    else:
        job = _load(jobs, job_id, caller.key_id)
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
        headers={
            "Content-Disposition": f'inline; filename="{filename}"',
            "ETag": f'"{hashlib.sha256(job.output_keys[index].encode()).hexdigest()[:32]}"',
            "Cache-Control": "private, max-age=300",
        },
    )


@router.post(
    "/{job_id}/cancel",
    response_model=EditJobResponse,
    responses=_errors(401, 404, 409, 503),
    summary="Cancel a job",
    description="Canceling a canceled job answers 200 with it as it stands (a retried "
    "request); a job that already succeeded or failed is 409 `job_finished`.",
)
def cancel_edit(
    job_id: str, request: Request, caller: CallerDep, jobs: JobStoreDep, view: JobViewDep
) -> EditJobResponse:
    _load(jobs, job_id, caller.key_id)
    try:
        job = jobs.cancel(job_id)
        # This request ended the job: its `completed` webhook is this request's to send.
        request.app.state.notify(job, WebhookEvent.completed)
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
    return view.render(job)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={
        204: {"description": "Deleted: the record, input, mask and outputs are gone"},
        **_errors(401, 404, 503),
    },
    summary="Delete a job and its images",
    description="A job that has not finished is canceled first. Afterwards the job is 404 "
    "and its stored images (input, mask, every output) are deleted.",
)
def delete_edit(job_id: str, caller: CallerDep, jobs: JobStoreDep, storage: StorageDep) -> Response:
    job = _load(jobs, job_id, caller.key_id)
    if job.status not in FINISHED:
        try:
            job = jobs.cancel(job_id)
        except TransitionRefused as refused:  # it finished meanwhile
            job = refused.job
        except JobNotFound:  # deleted meanwhile
            return Response(status_code=status.HTTP_204_NO_CONTENT)
    delete_job(jobs, storage, job)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
