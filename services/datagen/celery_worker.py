"""Celery entry point of the datagen worker.

    celery --app services.datagen.celery_worker worker --queues datagen \
        --pool prefork --concurrency 1

The API queues one planning task per (re)queued run; it enqueues the run's chunk tasks.
A run is split into chunks of rows, one task each (short tasks: a restarted worker loses
at most a chunk's unfinished row, and several workers share a run); the chunk that
completes a run enqueues its export. What the tasks do is ``run_tasks``; this module gives
them their own time limits, retries for Redis or storage outages, and a failure record:
any exception a task ends with, and a hard time limit, mark the run failed with the error,
so no run stays ``running`` with nothing working on it. The error a run records names
the exception's type at most, never its text (which may carry a server path); Celery's
log of the failed task has the detail. Models load once per pool process,
on first use. On a warm shutdown (SIGTERM) chunks stop after the row in progress and hand
their remaining rows back to the queue.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from functools import cache
from typing import TypeVar

import redis
from billiard.exceptions import TimeLimitExceeded
from celery import Task, signals
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.serialization import UnpickleableExceptionWrapper

from services.common.celery_app import create_celery_app
from services.common.datasets import DATAGEN_PLAN_TASK, RunStore
from services.common.logging import configure_celery_logging
from services.common.queues import DATAGEN_CHUNK_TASK, DATAGEN_EXPORT_TASK, DATAGEN_QUEUE
from services.common.settings import get_settings
from services.common.storage import open_storage
from services.datagen.run_tasks import (
    CHUNK_SOFT_TIME_LIMIT_S,
    CHUNK_TIME_LIMIT_S,
    EXPORT_SOFT_TIME_LIMIT_S,
    EXPORT_TIME_LIMIT_S,
    PLAN_SOFT_TIME_LIMIT_S,
    PLAN_TIME_LIMIT_S,
    TRANSIENT_RETRIES,
    RunContext,
    RunFailed,
    export_run,
    fail_run,
    generate_chunk,
    is_transient,
    plan_run,
)

T = TypeVar("T")

log = logging.getLogger("instructedit.datagen")

settings = get_settings()
app = create_celery_app(settings)
app.conf.task_routes = {
    **app.conf.task_routes,
    DATAGEN_PLAN_TASK: {"queue": DATAGEN_QUEUE},
    DATAGEN_CHUNK_TASK: {"queue": DATAGEN_QUEUE},
    DATAGEN_EXPORT_TASK: {"queue": DATAGEN_QUEUE},
}
# With acks_late over Redis an unacked message is redelivered after the visibility
# timeout, by whichever consumer looks first. Datagen keeps its unacked messages under its
# own keys with a timeout above its chunk task's hard limit, so neither the edit workers'
# shorter timeout nor a change of the edit limits redelivers a chunk that is still running.
# (A long export does outlast it: its lease turns the redelivered copy away.)
DATAGEN_VISIBILITY_TIMEOUT_S = max(
    2 * CHUNK_TIME_LIMIT_S,
    app.conf.broker_transport_options.get("visibility_timeout", 0),
)
app.conf.broker_transport_options = {
    **app.conf.broker_transport_options,
    "visibility_timeout": DATAGEN_VISIBILITY_TIMEOUT_S,
    "unacked_key": "unacked_datagen",
    "unacked_index_key": "unacked_datagen_index",
    "unacked_mutex_key": "unacked_datagen_mutex",
}

# Set in the main process when the worker starts shutting down; the pool processes,
# forked after this module was imported, share it and stop between rows.
_draining = multiprocessing.Event()


@signals.worker_shutting_down.connect
def _drain(**_) -> None:
    _draining.set()


@signals.worker_process_init.connect
def _import_models(**_) -> None:
    # torch, diffusers and transformers load before any task: a time limit that struck
    # inside an import would leave a half-imported module, and every later task of the
    # process would fail on it.
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from diffusers.utils.torch_utils import randn_tensor  # noqa: F401
    from transformers import AutoProcessor, CLIPModel  # noqa: F401

    import services.datagen.clip_filter
    import services.datagen.pair_pipeline  # noqa: F401


@signals.setup_logging.connect
def _json_logs(**kwargs) -> None:
    configure_celery_logging(service="datagen", **kwargs)


@cache
def _runs() -> RunStore:
    return RunStore(redis.Redis.from_url(settings.redis_url), settings.job_ttl_s)


@cache
def _context() -> RunContext:
    return RunContext(
        runs=_runs(),
        storage=open_storage(settings),
        default_model=settings.datagen_model,
        device=settings.device,
        send=lambda name, args, kwargs: app.send_task(
            name, args=args, kwargs=kwargs, queue=DATAGEN_QUEUE
        ),
        draining=_draining.is_set,
    )


def _failure(task_name: str, exc: BaseException, args) -> tuple[str, str]:
    """The error code and message a task's exception leaves on its run: the exception's
    type at most, never its text (it may name a path on this server)."""
    if task_name == DATAGEN_CHUNK_TASK and len(args) >= 3:
        what = f"rows {args[1]}-{args[2]}"
    elif task_name == DATAGEN_PLAN_TASK:
        what = "planning its tasks"
    else:
        what = "the export"
    if isinstance(exc, UnpickleableExceptionWrapper):
        # How Celery hands over an exception it could not pickle: its name survives.
        code = "export_failed" if task_name == DATAGEN_EXPORT_TASK else "worker_error"
        return code, f"{what}: {exc.exc_cls_name}"
    if isinstance(exc, RunFailed):
        return exc.code, exc.message
    if isinstance(exc, TimeLimitExceeded):
        limit = exc.args[0] if exc.args else "?"
        return "time_limit_exceeded", f"{what}: the hard time limit ({limit} s) was exceeded"
    if isinstance(exc, SoftTimeLimitExceeded):
        return "time_limit_exceeded", f"{what}: the soft time limit was exceeded"
    code = "export_failed" if task_name == DATAGEN_EXPORT_TASK else "worker_error"
    return code, f"{what}: {type(exc).__name__}"


class DatagenTask(Task):
    """Records every way a datagen task can end badly on its run. ``on_failure`` runs in
    the pool process for exceptions and in the main process for a hard time limit (the pool
    process was killed), where nothing else would notice."""

    # Long GPU work: acknowledged once done, back on the queue if its process dies.
    acks_late = True
    reject_on_worker_lost = True
    max_retries = TRANSIENT_RETRIES

    def run_retrying(self, work: Callable[[], T]) -> T:
        """Run `work`; a transient error (Redis, storage) retries the task later."""
        try:
            return work()
        except Exception as exc:
            if not is_transient(exc):
                raise
            raise _retry(self, exc) from exc

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        run_id = args[0] if args else kwargs.get("run_id")
        if run_id is None:
            return
        code, message = _failure(self.name, exc, args)
        try:
            fail_run(_runs(), run_id, kwargs.get("generation"), code, message)
        except Exception:
            # Redis itself is out: a later post of the run's spec resumes it once it is
            # stale (STALE_RUN_AFTER_S).
            log.exception("could not record the failure of dataset run %s", run_id)


def _retry(task: Task, exc: Exception) -> Exception:
    """The exception to end a task with after a transient error: a Retry (the task runs
    again later, rows already stored are skipped) or, when retries are used up, the
    run's failure."""
    retries = task.request.retries
    if retries >= TRANSIENT_RETRIES:
        log.error("%s: %s: %s; no retries left", task.name, type(exc).__name__, exc)
        return RunFailed(
            "service_unavailable",
            f"{type(exc).__name__} (still failing after {retries} retries)",
        )
    log.warning(
        "%s: %s: %s; retry %d of %d",
        task.name,
        type(exc).__name__,
        exc,
        retries + 1,
        TRANSIENT_RETRIES,
    )
    return task.retry(exc=exc, countdown=min(2**retries, 60), throw=False)


@app.task(
    bind=True,
    base=DatagenTask,
    name=DATAGEN_PLAN_TASK,
    soft_time_limit=PLAN_SOFT_TIME_LIMIT_S,
    time_limit=PLAN_TIME_LIMIT_S,
)
def plan_dataset_run(self, run_id: str, generation: int | None = None) -> int:
    return self.run_retrying(lambda: plan_run(_context(), run_id, generation))


@app.task(
    bind=True,
    base=DatagenTask,
    name=DATAGEN_CHUNK_TASK,
    soft_time_limit=CHUNK_SOFT_TIME_LIMIT_S,
    time_limit=CHUNK_TIME_LIMIT_S,
)
def generate_rows(
    self, run_id: str, start: int, stop: int, generation: int | None = None, stalls: int = 0
) -> int:
    # The message's own limits (timelimit = (hard, soft)) when it has them, else the task's.
    soft_limit = (self.request.timelimit or (None, None))[1] or self.soft_time_limit
    return self.run_retrying(
        lambda: generate_chunk(_context(), run_id, start, stop, generation, stalls, soft_limit)
    )


@app.task(
    bind=True,
    base=DatagenTask,
    name=DATAGEN_EXPORT_TASK,
    soft_time_limit=EXPORT_SOFT_TIME_LIMIT_S,
    time_limit=EXPORT_TIME_LIMIT_S,
)
def export_dataset_run(self, run_id: str, generation: int | None = None) -> bool:
    return self.run_retrying(lambda: export_run(_context(), run_id, generation))
