"""Celery entry point of the GPU edit worker.

    celery --app services.gpu_worker.celery_worker worker --queues edits \
        --pool prefork --concurrency 1

One pool process per GPU. The parent resolves (downloads) the model and never touches
CUDA; each pool child loads the engine once in `worker_process_init`, warms it up, and
keeps it for every task it runs. A child that dies is replaced by a fresh one.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from functools import partial

import redis
from celery import signals

from services.common.celery_app import create_celery_app
from services.common.diffusion import ModelUnavailable, resolve_pipeline_dir
from services.common.jobs import JobStore, utcnow
from services.common.logging import configure_celery_logging
from services.common.queues import EDIT_TASK, enqueue_edit
from services.common.settings import get_settings
from services.common.storage import open_storage
from services.common.workers import EngineStatus, WorkerRegistry
from services.gpu_worker.edit_job import Deferred, EditRunner
from services.gpu_worker.engine import EditEngine, EngineOptions
from services.gpu_worker.families import NO_MODEL_HINT, family_for_model
from services.gpu_worker.metrics import MetricsObserver, start_metrics_server
from services.gpu_worker.reaper import JobReaper

log = logging.getLogger("instructedit.gpu_worker")

settings = get_settings()
app = create_celery_app(settings)


class _Process:
    """What one pool process keeps between tasks."""

    model_path: str | None = None
    runner: EditRunner | None = None


state = _Process()


# JSON logs with the job's request id, instead of Celery's own handlers.
signals.setup_logging.connect(configure_celery_logging)


@signals.worker_init.connect
def _resolve_model_in_parent(**_) -> None:
    try:
        model_dir = resolve_pipeline_dir(settings.model, NO_MODEL_HINT)
        family = family_for_model(model_dir)  # an unservable model stops the worker here
        log.info("edit model %s is a %s model", model_dir, family.name)
        state.model_path = str(model_dir)
    except ModelUnavailable as exc:
        # One clear line and a non-zero exit, instead of children failing every job.
        log.critical("%s", exc)
        print(f"instructedit worker cannot start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    # Before the pool forks, so every child writes into the same multiprocess registry.
    start_metrics_server(settings.worker_metrics_port)


@signals.worker_process_init.connect
def _load_engine_in_child(**_) -> None:
    _setup_process()


def child_device(requested: str) -> str:
    """One pool process per GPU: pool child i serves GPU i (`--concurrency` = GPU count)."""
    if requested not in ("auto", "cuda"):
        return requested
    import torch
    from billiard.process import current_process

    if not torch.cuda.is_available():
        return requested
    index = getattr(current_process(), "index", None) or 0
    return f"cuda:{index % torch.cuda.device_count()}"


def _setup_process() -> None:
    client = redis.Redis.from_url(settings.redis_url)
    jobs = JobStore(client, settings.job_ttl_s, redeliver_after_s=settings.job_redeliver_after_s)
    # In every pool process, not the parent: the parent forks replacements, and a thread
    # there could hold a lock at the fork. A lock in Redis keeps it to one sweep a round.
    reaper = JobReaper(jobs, partial(enqueue_edit, app), settings.job_redeliver_after_s)
    reaper.keep_sweeping(settings.reaper_interval_s)
    model_path = state.model_path or str(resolve_pipeline_dir(settings.model, NO_MODEL_HINT))
    engine: EditEngine | None = EditEngine(
        model_path,
        EngineOptions.from_settings(settings, device=child_device(settings.device)),
    )
    engine_error = None
    try:
        info = engine.setup()
        if settings.warmup:
            # Every (resolution bucket x batch bucket x guidance) shape the settings put
            # in use when the UNet is compiled; the square bucket alone when it is not.
            info = engine.warmup()
        WorkerRegistry(client).keep_announcing(
            EngineStatus(
                **info.model_dump(),
                worker=f"{socket.gethostname()}:{os.getpid()}",
                ready_at=utcnow(),
            )
        )
        log.info("edit engine ready: %s", info)
    except Exception as exc:
        log.exception("loading the model from %s failed", model_path)
        engine, engine_error = None, f"the worker could not load the model: {exc}"
    state.runner = EditRunner(
        engine,
        jobs,
        open_storage(settings),
        max_batch=settings.max_batch,
        batch_window_ms=settings.batch_window_ms,
        lease_s=settings.job_lease_s,
        engine_error=engine_error,
        observer=MetricsObserver(),
        io_threads=settings.io_threads,
        prefetch_batches=settings.prefetch_batches,
        max_task_s=settings.task_soft_time_limit_s,
    )


@app.task(name=EDIT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def edit(self, job_id: str) -> dict | None:
    if state.runner is None:  # solo/threads pools have no worker_process_init
        _setup_process()
    outcome = state.runner.handle(job_id)
    if isinstance(outcome, Deferred):
        # Another live worker holds the job. Look again once its lease could have lapsed,
        # so a job whose worker died is never left behind.
        raise self.retry(countdown=outcome.seconds, max_retries=None)
    # None: a job this worker no longer held (taken over, or already ended elsewhere).
    return {k: str(v) for k, v in outcome.items() if v is not None} if outcome else None
