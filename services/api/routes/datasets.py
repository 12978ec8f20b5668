"""/v1/datasets: build product edit datasets on the datagen workers."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response, status

from services.api.deps import CeleryDep, RunStoreDep
from services.api.errors import APIError, ErrorResponse
from services.common.datasets import (
    RUN_FINISHED,
    DatasetRun,
    DatasetSpec,
    RunStatus,
    chunk_ranges,
)
from services.common.jobs import utcnow
from services.common.queues import DATAGEN_CHUNK_TASK, DATAGEN_QUEUE

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_ERRORS = {code: {"model": ErrorResponse} for code in (404, 409, 422, 503)}


def _load(runs: RunStoreDep, run_id: str) -> DatasetRun:
    run = runs.get(run_id)
    if run is None:
        raise APIError(404, "run_not_found", f"no dataset run with id {run_id!r}")
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
    run, enqueue = runs.create_or_resume(spec)
    if enqueue:
        try:
            # One task per chunk of rows: short tasks survive worker restarts cheaply, and
            # several datagen workers share a run.
            for start, stop in chunk_ranges(spec.total_rows):
                celery.send_task(
                    DATAGEN_CHUNK_TASK, args=[run.id, start, stop], queue=DATAGEN_QUEUE
                )
        except Exception as exc:
            log.error("enqueueing dataset run %s failed: %s", run.id, exc)
            runs.update(run.id, status=RunStatus.failed, finished_at=utcnow())
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
    run = _load(runs, run_id)
    if run.status in RUN_FINISHED:
        raise APIError(409, "run_finished", f"run {run_id} already ended as {run.status}")
    # Workers check the status before each row; stored rows stay for a later resume.
    return runs.update(run_id, status=RunStatus.canceled, finished_at=utcnow())
