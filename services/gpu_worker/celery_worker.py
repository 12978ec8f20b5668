"""Celery entry point of the GPU edit worker.

    celery --app services.gpu_worker.celery_worker worker --queues edits \
        --pool prefork --concurrency 1

The parent process resolves (downloads) the model and never touches CUDA; each pool child
loads the engine once in `worker_process_init` and keeps it for every task it runs.
"""

from __future__ import annotations

import logging
import sys

import redis
from celery import signals

from services.common.celery_app import create_celery_app
from services.common.jobs import JobStore
from services.common.queues import EDIT_TASK
from services.common.settings import get_settings
from services.common.storage import open_storage
from services.gpu_worker.edit_job import run_edit_job
from services.gpu_worker.engine import EditEngine
from services.gpu_worker.model_loading import ModelUnavailable, resolve_model

log = logging.getLogger("instructedit.gpu_worker")

settings = get_settings()
app = create_celery_app(settings)


class _Process:
    """What one pool process keeps between tasks."""

    model_path: str | None = None
    engine: EditEngine | None = None
    engine_error: str | None = None
    jobs: JobStore | None = None
    storage = None


state = _Process()


@signals.worker_init.connect
def _resolve_model_in_parent(**_) -> None:
    try:
        state.model_path = str(resolve_model(settings.model))
    except ModelUnavailable as exc:
        # One clear line and a non-zero exit, instead of children failing every job.
        log.critical("%s", exc)
        print(f"instructedit worker cannot start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


@signals.worker_process_init.connect
def _load_engine_in_child(**_) -> None:
    _setup_process()


def _setup_process() -> None:
    state.jobs = JobStore(redis.Redis.from_url(settings.redis_url), settings.job_ttl_s)
    state.storage = open_storage(settings)
    model_path = state.model_path or str(resolve_model(settings.model))
    engine = EditEngine(model_path, settings.device)
    try:
        engine.setup()
    except Exception as exc:
        log.exception("loading the model from %s failed", model_path)
        state.engine_error = f"the worker could not load the model: {type(exc).__name__}: {exc}"
        return
    state.engine = engine


@app.task(name=EDIT_TASK, acks_late=True, reject_on_worker_lost=True)
def edit(job_id: str) -> str | None:
    if state.jobs is None:  # solo/threads pools have no worker_process_init
        _setup_process()
    status = run_edit_job(
        job_id,
        state.engine,
        state.jobs,
        state.storage,
        settings.max_side,
        engine_error=state.engine_error,
    )
    return status.value if status else None
