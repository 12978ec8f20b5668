"""Celery entry point of the datagen worker.

    celery --app services.datagen.celery_worker worker --queues datagen \
        --pool prefork --concurrency 1

A run is split into chunks of rows, one task each (short tasks: a restarted worker loses
at most a chunk's unfinished row, and several workers share a run). The chunk that
completes a run enqueues its export. Models load once per pool process, on first use.
"""

from __future__ import annotations

import logging

import redis
from celery import signals

from services.common.celery_app import create_celery_app
from services.common.datasets import RUN_FINISHED, RunError, RunStatus, RunStore, chunk_ranges
from services.common.jobs import utcnow
from services.common.logging import configure_celery_logging
from services.common.queues import DATAGEN_CHUNK_TASK, DATAGEN_EXPORT_TASK, DATAGEN_QUEUE
from services.common.settings import get_settings
from services.common.storage import open_storage
from services.datagen.builder import DatasetBuilder, clip_filter_for, generator_for

log = logging.getLogger("instructedit.datagen")

settings = get_settings()
app = create_celery_app(settings)
app.conf.task_routes = {
    **app.conf.task_routes,
    DATAGEN_CHUNK_TASK: {"queue": DATAGEN_QUEUE},
    DATAGEN_EXPORT_TASK: {"queue": DATAGEN_QUEUE},
}


@signals.setup_logging.connect
def _json_logs(**kwargs) -> None:
    configure_celery_logging(service="datagen", **kwargs)


def _runs() -> RunStore:
    return RunStore(redis.Redis.from_url(settings.redis_url), settings.job_ttl_s)


def _fail(runs: RunStore, run_id: str, code: str, message: str) -> None:
    log.error("dataset run %s failed: %s: %s", run_id, code, message)
    runs.update(
        run_id,
        status=RunStatus.failed,
        error=RunError(code=code, message=message),
        finished_at=utcnow(),
    )


def _builder(run) -> DatasetBuilder:
    generator = generator_for(run.spec, settings.datagen_model, settings.device)
    clip = clip_filter_for(run.spec, settings.device)
    return DatasetBuilder(run.id, run.spec, open_storage(settings), generator, clip)


@app.task(name=DATAGEN_CHUNK_TASK, acks_late=True, reject_on_worker_lost=True)
def generate_rows(run_id: str, start: int, stop: int) -> int:
    runs = _runs()
    run = runs.get(run_id)
    if run is None or run.status in RUN_FINISHED:
        return 0
    if run.status == RunStatus.queued:
        run = runs.update(run_id, status=RunStatus.running, started_at=utcnow())
    try:
        builder = _builder(run)
    except Exception as exc:
        _fail(runs, run_id, "model_unavailable", f"{type(exc).__name__}: {exc}")
        return 0
    done = 0
    for index in range(start, stop):
        current = runs.get(run_id)
        if current is None or current.status in RUN_FINISHED:
            log.info("dataset run %s is %s; stopping", run_id, current and current.status)
            return done
        try:
            outcome = builder.process_row(index)
        except Exception as exc:
            log.exception("row %d of dataset run %s failed", index, run_id)
            _fail(runs, run_id, "generation_failed", f"row {index}: {type(exc).__name__}: {exc}")
            return done
        runs.row_done(run_id, index, outcome.generated, outcome.kept)
        done += 1
    if runs.chunk_done(run_id, start) == len(chunk_ranges(run.spec.total_rows)):
        app.send_task(DATAGEN_EXPORT_TASK, args=[run_id], queue=DATAGEN_QUEUE)
    return done


@app.task(name=DATAGEN_EXPORT_TASK, acks_late=True, reject_on_worker_lost=True)
def export_run(run_id: str) -> None:
    runs = _runs()
    run = runs.get(run_id)
    if run is None or run.status in RUN_FINISHED:
        return
    runs.update(run_id, status=RunStatus.exporting)
    try:
        summary = _builder(run).export()
    except Exception as exc:
        log.exception("export of dataset run %s failed", run_id)
        _fail(runs, run_id, "export_failed", f"{type(exc).__name__}: {exc}")
        return
    runs.update(
        run_id,
        status=RunStatus.succeeded,
        export_prefix=summary.card_key.rsplit("/", 1)[0],
        export_files=[*summary.shard_keys, summary.card_key],
        finished_at=utcnow(),
    )
