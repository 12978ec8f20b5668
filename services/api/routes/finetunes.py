"""/v1/finetunes: fine-tune a LoRA adapter on one of your datasets, on the GPU workers.

A fine-tune belongs to the API key that created it: another key's reads as missing (404
finetune_not_found), and a listing shows the caller's only. What a fine-tune makes is an
adapter owned by the same key: once it succeeded, its `adapter` id goes in the `adapter`
of POST /v1/edits.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response, status
from pydantic import BaseModel, Field

from services.api.auth import CallerDep, OptionalCallerDep, unauthorized
from services.api.deps import (
    CeleryDep,
    IdempotencyDep,
    LimitsDep,
    RunStoreDep,
    SettingsDep,
    StorageDep,
)
from services.api.errors import APIError, ErrorResponse
from services.api.idempotency import IdempotencyKey, fingerprint
from services.api.routes.datasets import _check_choice, allowed_ids
from services.common.datasets import RunStatus
from services.common.finetunes import (
    FINETUNE_ACTIVE,
    Finetune,
    FinetuneError,
    FinetuneNotFound,
    FinetuneProgress,
    FinetuneRequest,
    FinetuneStatus,
    FinetuneStore,
    FinetuneTransitionRefused,
)
from services.common.jobs import utcnow
from services.common.listing import MAX_PAGE, BadCursor
from services.common.queues import FINETUNE_TASK, TRAIN_QUEUE
from services.common.settings import Settings
from services.common.storage import ObjectNotFound

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/finetunes", tags=["finetunes"])

_ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 409, 422, 429, 503)}


def get_finetune_store(request: Request) -> FinetuneStore:
    state = request.app.state
    store = getattr(state, "finetunes", None)
    if store is None:
        store = state.finetunes = FinetuneStore(state.redis, state.settings.job_ttl_s)
    return store


FinetuneStoreDep = Annotated[FinetuneStore, Depends(get_finetune_store)]


class FinetuneResponse(BaseModel):
    id: str
    status: FinetuneStatus
    request: FinetuneRequest
    progress: FinetuneProgress
    # The step the validation renders are of, and short-lived URLs of them (as outputs').
    validation_step: int | None = None
    validation_urls: list[str] = []
    adapter: str | None = Field(
        None,
        description="The LoRA adapter id the fine-tune made, to give as `adapter` of "
        "POST /v1/edits; null until it succeeded",
    )
    error: FinetuneError | None = None
    generation: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None


class FinetuneListResponse(BaseModel):
    data: list[FinetuneResponse]
    next_cursor: str | None = None


def validation_path(finetune_id: str, index: int) -> str:
    return f"/v1/finetunes/{finetune_id}/validation/{index}"


def _render(finetune: Finetune, request: Request, settings: Settings, storage) -> FinetuneResponse:
    expiry = settings.presigned_url_expiry_s
    signer = request.app.state.url_signer
    urls = []
    for index, key in enumerate(finetune.validation_keys):
        url = storage.presigned_url(key, expiry)
        if url is None:
            base = settings.public_base_url.rstrip("/")
            url = base + signer.sign(validation_path(finetune.id, index), expiry)
        urls.append(url)
    fields = finetune.model_dump(exclude={"owner", "validation_keys"})
    return FinetuneResponse(**fields, validation_urls=urls)


def _not_found(finetune_id: str) -> APIError:
    return APIError(404, "finetune_not_found", f"no fine-tune with id {finetune_id!r}")


def _load(store: FinetuneStore, finetune_id: str, owner: str) -> Finetune:
    finetune = store.get(finetune_id)
    if finetune is None or finetune.owner != owner:
        raise _not_found(finetune_id)
    return finetune


def _check_dataset(body: FinetuneRequest, owner: str, runs) -> None:
    run = runs.get(body.dataset)
    if run is None or run.owner != owner:
        raise APIError(422, "invalid_dataset", f"dataset: you have no dataset run {body.dataset!r}")
    if run.status != RunStatus.succeeded or not run.export_prefix:
        raise APIError(
            422,
            "invalid_dataset",
            f"dataset: run {body.dataset!r} is {run.status}; a fine-tune needs one that succeeded",
        )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=FinetuneResponse,
    responses={
        202: {
            "description": "Accepted: the fine-tune is queued (or resumed, or as it stands)",
            "headers": {
                "Location": {"description": "The fine-tune's URL", "schema": {"type": "string"}}
            },
        },
        200: {
            "model": FinetuneResponse,
            "description": "With an `Idempotency-Key` already used for the same request: "
            "the fine-tune that request started",
        },
        **_ERRORS,
    },
    summary="Start (or resume) a fine-tune",
)
def create_finetune(
    body: FinetuneRequest,
    request: Request,
    response: Response,
    caller: CallerDep,
    store: FinetuneStoreDep,
    runs: RunStoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
    storage: StorageDep,
    limits: LimitsDep,
    idempotency: IdempotencyDep,
    idempotency_key: IdempotencyKey = None,
) -> FinetuneResponse:
    """The same key posting the same request gets the same fine-tune. New, failed,
    canceled and stale ones (running, but no worker has reported for 15 minutes) are
    (re)queued as a new generation and resume from their latest stored checkpoint; any
    other is returned as it is.

    `dataset` must be one of your dataset runs that succeeded (else 422 invalid_dataset);
    `base_model` null or one the server allows (else 422 invalid_base_model)."""
    _check_choice("base_model", body.base_model, allowed_ids(settings.finetune_base_models))
    _check_dataset(body, caller.key_id, runs)
    owner = caller.key_id
    if idempotency_key is None:
        finetune = _start(body, owner, store, celery, limits)
    else:
        finetune, replayed = idempotency.run_once(
            owner,
            idempotency_key,
            fingerprint("/v1/finetunes", [("request", body.model_dump_json())]),
            body.finetune_id(owner),
            lambda _: _start(body, owner, store, celery, limits),
            lambda finetune_id: store.get(finetune_id),
        )
        if replayed:
            response.status_code = status.HTTP_200_OK
            response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/finetunes/{finetune.id}"
    return _render(finetune, request, settings, storage)


def _start(body: FinetuneRequest, owner: str, store: FinetuneStore, celery, limits) -> Finetune:
    limits.hit(owner)
    finetune, enqueue = store.create_or_resume(body, owner)
    if enqueue:
        try:
            celery.send_task(
                FINETUNE_TASK, args=[finetune.id, finetune.generation], queue=TRAIN_QUEUE
            )
        except Exception as exc:
            log.error("enqueueing fine-tune %s failed: %s", finetune.id, exc)
            with contextlib.suppress(FinetuneNotFound, FinetuneTransitionRefused):
                store.transition(
                    finetune.id,
                    {FinetuneStatus.queued},
                    when=lambda current: current.generation == finetune.generation,
                    status=FinetuneStatus.failed,
                    error=FinetuneError(
                        code="queue_unavailable", message="the fine-tune could not be queued"
                    ),
                    finished_at=utcnow(),
                )
            raise APIError(503, "queue_unavailable", "the fine-tune could not be queued") from None
    return finetune


@router.get(
    "",
    response_model=FinetuneListResponse,
    responses=_ERRORS,
    summary="List your fine-tunes, newest first",
)
def list_finetunes(
    request: Request,
    caller: CallerDep,
    store: FinetuneStoreDep,
    settings: SettingsDep,
    storage: StorageDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the page before")] = None,
    status: Annotated[
        FinetuneStatus | None, Query(description="only fine-tunes in this status")
    ] = None,
) -> FinetuneListResponse:
    try:
        data, next_cursor = store.list_finetunes(caller.key_id, limit, cursor, status)
    except BadCursor as exc:
        raise APIError(422, "invalid_cursor", str(exc)) from None
    return FinetuneListResponse(
        data=[_render(f, request, settings, storage) for f in data], next_cursor=next_cursor
    )


@router.get(
    "/{finetune_id}",
    response_model=FinetuneResponse,
    responses=_ERRORS,
    summary="Get a fine-tune: status, progress, validation renders, its adapter",
)
def get_finetune(
    finetune_id: str,
    request: Request,
    caller: CallerDep,
    store: FinetuneStoreDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> FinetuneResponse:
    return _render(_load(store, finetune_id, caller.key_id), request, settings, storage)


@router.post(
    "/{finetune_id}/cancel",
    response_model=FinetuneResponse,
    responses=_ERRORS,
    summary="Cancel a fine-tune (again: 200 with the canceled one; a finished one: 409)",
)
def cancel_finetune(
    finetune_id: str,
    request: Request,
    caller: CallerDep,
    store: FinetuneStoreDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> FinetuneResponse:
    """Cancel a queued or running fine-tune: its worker checkpoints and stops after the
    step it is on. Posting the same request again resumes it from that checkpoint."""
    _load(store, finetune_id, caller.key_id)
    try:
        store.transition(
            finetune_id, FINETUNE_ACTIVE, status=FinetuneStatus.canceled, finished_at=utcnow()
        )
    except FinetuneNotFound:
        raise _not_found(finetune_id) from None
    except FinetuneTransitionRefused as refused:
        if refused.finetune.status != FinetuneStatus.canceled:
            raise APIError(
                409,
                "finetune_finished",
                f"fine-tune {finetune_id} already ended as {refused.finetune.status}",
            ) from None
    return _render(_load(store, finetune_id, caller.key_id), request, settings, storage)


@router.get(
    "/{finetune_id}/validation/{index}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **_ERRORS},
    summary="Download a validation render",
    description="With the `expires` and `signature` of a validation URL from the fine-tune, "
    "no key is needed until it expires; without them, the fine-tune's key is.",
)
def get_validation(
    finetune_id: str,
    index: int,
    request: Request,
    caller: OptionalCallerDep,
    store: FinetuneStoreDep,
    storage: StorageDep,
    expires: Annotated[int | None, Query(description="From the signed URL")] = None,
    signature: Annotated[
        str | None, Query(max_length=128, description="From the signed URL")
    ] = None,
) -> Response:
    signer = request.app.state.url_signer
    if signer.verify(validation_path(finetune_id, index), expires, signature):
        finetune = store.get(finetune_id)
        if finetune is None:
            raise _not_found(finetune_id)
    elif caller is None:
        what = "the URL expired" if signature else "an API key is required"
        raise unauthorized(f"{what}: get a fresh URL from the fine-tune, or send its API key")
    else:
        finetune = _load(store, finetune_id, caller.key_id)
    if not 0 <= index < len(finetune.validation_keys):
        raise APIError(
            404, "validation_not_found", f"fine-tune {finetune_id} has no validation render {index}"
        )
    try:
        data = storage.get(finetune.validation_keys[index])
    except ObjectNotFound:
        raise APIError(
            404, "validation_not_found", f"fine-tune {finetune_id} has no validation render {index}"
        ) from None
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})
