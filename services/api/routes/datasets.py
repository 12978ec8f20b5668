"""/v1/datasets: build product edit datasets on the datagen workers.

Every run belongs to the API key that created it: another key's run reads as missing
(404 run_not_found), and a listing shows the caller's runs only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.routing import APIRoute

from services.api.auth import CallerDep
from services.api.dataset_rows import checked_rows
from services.api.deps import CeleryDep, IdempotencyDep, LimitsDep, RunStoreDep, SettingsDep
from services.api.errors import APIError, ErrorResponse
from services.api.idempotency import IdempotencyKey, fingerprint
from services.common.datasets import (
    DATAGEN_PLAN_TASK,
    MAX_SPEC_BYTES,
    RUN_ACTIVE,
    DatasetRun,
    DatasetRunList,
    DatasetSpec,
    RunError,
    RunNotFound,
    RunStatus,
    RunTransitionRefused,
)
from services.common.jobs import utcnow
from services.common.listing import MAX_PAGE, BadCursor
from services.common.queues import DATAGEN_QUEUE
from services.common.settings import Settings

log = logging.getLogger(__name__)


def _payload_too_large(limit: int) -> APIError:
    # The rest of the body is not read: the connection cannot carry another request.
    return APIError(
        413,
        "payload_too_large",
        f"the request body is larger than the limit of {limit} bytes",
        headers={"Connection": "close"},
    )


class BoundedBodyRoute(APIRoute):
    """A route that reads a request body of at most MAX_SPEC_BYTES, before FastAPI parses
    it: a declared Content-Length over the bound is refused unread, and a body without
    one (chunked) is cut off once over it (413 payload_too_large)."""

    max_body_bytes = MAX_SPEC_BYTES

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        limit = self.max_body_bytes

        async def bounded(request: Request) -> Response:
            if request.method in ("POST", "PUT", "PATCH"):
                declared = request.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise _payload_too_large(limit)
                body = bytearray()
                async for part in request.stream():
                    body += part
                    if len(body) > limit:
                        raise _payload_too_large(limit)
                # FastAPI reads the body from here (Request.body() keeps what was read).
                request._body = bytes(body)
            return await handler(request)

        return bounded


router = APIRouter(prefix="/v1/datasets", tags=["datasets"], route_class=BoundedBodyRoute)

_ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 409, 413, 422, 429, 503)}


def allowed_ids(value: object) -> tuple[str, ...]:
    """An allow-list setting as a tuple: "a, b" (the environment's form) or a sequence."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(str(part) for part in value)


def _check_choice(field: str, value: str | None, allowed: Iterable[str]) -> None:
    """422 invalid_<field> unless ``value`` is null or one of ``allowed``, exactly. The
    message names the allowed values only: nothing about what else the server has."""
    allowed = tuple(allowed)
    if value is None or value in allowed:
        return
    choices = ", ".join(repr(a) for a in allowed)
    also = f" or one of: {choices}" if allowed else " (this server allows no other)"
    raise APIError(
        422,
        f"invalid_{field}",
        f"{field}: not available; give null (the server's default){also}",
    )


def check_models(spec: DatasetSpec, settings: Settings) -> None:
    """The spec's models come from the operator's allow-lists: a client never names a
    path or a hub id the operator did not list."""
    _check_choice("model", spec.model, allowed_ids(settings.datagen_models))
    _check_choice("clip_model", spec.clip_model, allowed_ids(settings.datagen_clip_models))


def _not_found(run_id: str) -> APIError:
    return APIError(404, "run_not_found", f"no dataset run with id {run_id!r}")


def _load(runs: RunStoreDep, run_id: str, owner: str) -> DatasetRun:
    """The caller's run; another key's run is as missing as one that does not exist."""
    run = runs.get(run_id)
    if run is None or run.owner != owner:
        raise _not_found(run_id)
    return run


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DatasetRun,
    responses={
        202: {
            "description": "Accepted: the run is queued (or resumed, or as it stands)",
            "headers": {"Location": {"description": "The run's URL", "schema": {"type": "string"}}},
        },
        200: {
            "model": DatasetRun,
            "description": "With an `Idempotency-Key` already used for the same request: "
            "the run that request started",
        },
        **_ERRORS,
    },
    summary="Start (or resume) a dataset run",
)
def create_run(
    spec: DatasetSpec,
    response: Response,
    caller: CallerDep,
    runs: RunStoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
    limits: LimitsDep,
    idempotency: IdempotencyDep,
    idempotency_key: IdempotencyKey = None,
) -> DatasetRun:
    """The same key posting the same spec gets the same run. New, failed, canceled and
    stale runs (running, but no worker has reported for STALE_RUN_AFTER_S) are (re)queued
    as a new generation; any other run is returned as it is.

    One planning task is queued, whatever the run's size: a datagen worker enqueues the
    run's chunk tasks (those with rows still to make).

    Given `rows` must pass the data audit (422 rows_fail_audit, with each broken rule's
    rows); given `captions` are mapped to rows first (422 captions_unmapped, with each
    caption that could not be)."""
    check_models(spec, settings)
    request_json = spec.model_dump_json()
    spec = checked_rows(spec)
    if idempotency_key is None:
        run = _start(spec, caller.key_id, runs, celery, limits)
    else:
        run, replayed = idempotency.run_once(
            caller.key_id,
            idempotency_key,
            fingerprint("/v1/datasets", [("spec", request_json)]),
            spec.run_id(caller.key_id),
            lambda _: _start(spec, caller.key_id, runs, celery, limits),
            lambda run_id: runs.get(run_id),
        )
        if replayed:
            response.status_code = status.HTTP_200_OK
            response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/datasets/{run.id}"
    return run


def _start(spec: DatasetSpec, owner: str, runs, celery, limits) -> DatasetRun:
    limits.hit(owner)
    run, enqueue = runs.create_or_resume(spec, owner)
    if enqueue:
        try:
            celery.send_task(
                DATAGEN_PLAN_TASK,
                args=[run.id],
                kwargs={"generation": run.generation},
                queue=DATAGEN_QUEUE,
            )
        except Exception as exc:
            log.error("enqueueing dataset run %s failed: %s", run.id, exc)
            # Unless a cancel or another post changed it meanwhile.
            with contextlib.suppress(RunNotFound, RunTransitionRefused):
                runs.transition(
                    run.id,
                    {RunStatus.queued},
                    when=lambda current: current.generation == run.generation,
                    status=RunStatus.failed,
                    error=RunError(code="queue_unavailable", message="the run could not be queued"),
                    finished_at=utcnow(),
                )
            raise APIError(503, "queue_unavailable", "the run could not be queued") from None
    return run


@router.get(
    "",
    response_model=DatasetRunList,
    responses=_ERRORS,
    summary="List your runs, newest first",
)
def list_runs(
    caller: CallerDep,
    runs: RunStoreDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the page before")] = None,
    status: Annotated[RunStatus | None, Query(description="only runs in this status")] = None,
) -> DatasetRunList:
    try:
        data, next_cursor = runs.list_runs(caller.key_id, limit, cursor, status)
    except BadCursor as exc:
        raise APIError(422, "invalid_cursor", str(exc)) from None
    return DatasetRunList(data=data, next_cursor=next_cursor)


@router.get("/{run_id}", response_model=DatasetRun, responses=_ERRORS, summary="Get a run")
def get_run(run_id: str, caller: CallerDep, runs: RunStoreDep) -> DatasetRun:
    return _load(runs, run_id, caller.key_id)


@router.post(
    "/{run_id}/cancel",
    response_model=DatasetRun,
    responses=_ERRORS,
    summary="Cancel a run (again: 200 with the canceled run; a finished run: 409)",
)
def cancel_run(run_id: str, caller: CallerDep, runs: RunStoreDep) -> DatasetRun:
    """Cancel a queued, running or exporting run. Canceling a canceled run again answers
    200 with the run as it stands; a run that succeeded or failed is 409 run_finished.

    Compare-and-set: a worker starting, finishing or exporting the run at the same time
    can neither lose the cancel nor overwrite it. Workers check the status before each
    row and the export before it publishes; stored rows stay for a later resume (post the
    spec again)."""
    _load(runs, run_id, caller.key_id)
    try:
        runs.transition(run_id, RUN_ACTIVE, status=RunStatus.canceled, finished_at=utcnow())
    except RunNotFound:
        raise _not_found(run_id) from None
    except RunTransitionRefused as refused:
        if refused.run.status != RunStatus.canceled:
            raise APIError(
                409, "run_finished", f"run {run_id} already ended as {refused.run.status}"
            ) from None
    return _load(runs, run_id, caller.key_id)
