"""/v1/datasets: build product edit datasets on the datagen workers."""

from __future__ import annotations

import contextlib
import logging

from fastapi import APIRouter, Response, status

from services.api.deps import CeleryDep, RunStoreDep
from services.api.errors import APIError, ErrorResponse
from services.common.datasets import (
    RUN_ACTIVE,
    DatasetRun,
    DatasetSpec,
    RunError,
    RunNotFound,
    RunStatus,
    RunTransitionRefused,
)
from services.common.jobs import utcnow
from services.common.queues import DATAGEN_CHUNK_TASK, DATAGEN_QUEUE

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_ERRORS = {code: {"model": ErrorResponse} for code in (404, 409, 422, 503)}


def _not_found(run_id: str) -> APIError:
    return APIError(404, "run_not_found", f"no dataset run with id {run_id!r}")


def _load(runs: RunStoreDep, run_id: str) -> DatasetRun:
    run = runs.get(run_id)
    if run is None:
        raise _not_found(run_id)
    return run


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DatasetRun,
    responses=_ERRORS,
    summary="Start (or resume) a dataset run",
)
def create_run(
    spec: DatasetSpec, response: Response, runs: RunStoreDep, celery: CeleryDep
) -> DatasetRun:
    # New, failed, canceled and stale runs (running, but no worker has reported for
    # STALE_RUN_AFTER_S) are (re)queued as a new generation; any other run is returned.
    run, enqueue = runs.create_or_resume(spec)
    if enqueue:
        try:
            # One task per chunk of rows still to make: short tasks survive worker
            # restarts cheaply, and several datagen workers share a run. Tasks of an
            # earlier generation still queued exit without work.
            for start, stop in runs.chunks_to_enqueue(run):
                celery.send_task(
                    DATAGEN_CHUNK_TASK,
                    args=[run.id, start, stop],
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
    response.headers["Location"] = f"/v1/datasets/{run.id}"
    return run


@router.get("/{run_id}", response_model=DatasetRun, responses=_ERRORS, summary="Get a run")
def get_run(run_id: str, runs: RunStoreDep) -> DatasetRun:
    return _load(runs, run_id)


@router.post(
    "/{run_id}/cancel", response_model=DatasetRun, responses=_ERRORS, summary="Cancel a run"
)
def cancel_run(run_id: str, runs: RunStoreDep) -> DatasetRun:
    # Compare-and-set: a worker starting, finishing or exporting the run at the same time
    # can neither lose the cancel nor overwrite it. Workers check the status before each
    # row and the export before it publishes; stored rows stay for a later resume.
    try:
        runs.transition(run_id, RUN_ACTIVE, status=RunStatus.canceled, finished_at=utcnow())
    except RunNotFound:
        raise _not_found(run_id) from None
    except RunTransitionRefused as refused:
        raise APIError(
            409, "run_finished", f"run {run_id} already ended as {refused.run.status}"
        ) from None
    return _load(runs, run_id)
