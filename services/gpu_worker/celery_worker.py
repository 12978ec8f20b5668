"""Celery entry point of the GPU edit worker.

    celery --app services.gpu_worker.celery_worker worker --queues edits \
        --pool prefork --concurrency 1

One pool process per GPU. The parent resolves (downloads) the model and never touches
CUDA; each pool child loads the engine once in `worker_process_init`, warms it up, and
keeps it for every task it runs. A child that dies is replaced by a fresh one.

A child that dies while it holds jobs (SIGKILL, the OOM killer) cannot give them back.
Each child records which jobs it holds in Redis (edit_job.HeldJobs, listed under its
parent); when the parent is about to start the replacement it lets the leases of the dead
child's jobs lapse and sends them to the queue again, so that they run again at once
instead of a whole lease later.
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
from services.common.webhook_notify import WebhookNotifier
from services.common.workers import EngineStatus, WorkerRegistry
from services.gpu_worker.edit_job import Deferred, EditRunner, HeldJobs, lapse_lease
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
    _setup_process(pool_child=True)


# -- the jobs of a pool child that died ------------------------------------------------


def children_key(parent_pid: int, namespace: str = "instructedit") -> str:
    """The set of the pool children (pids) of worker parent `parent_pid` on this host."""
    return f"{namespace}:worker-children:{socket.gethostname()}:{parent_pid}"


def held_jobs_key(parent_pid: int, pid: int, namespace: str = "instructedit") -> str:
    """Where pool child `pid` of `parent_pid` records the jobs it holds (HeldJobs)."""
    return f"{namespace}:worker-child:{socket.gethostname()}:{parent_pid}:{pid}"


def _register_child(client: redis.Redis, jobs: JobStore) -> HeldJobs:
    """This pool child's record of held jobs, listed in its parent's set of children."""
    parent, pid = os.getppid(), os.getpid()
    held = HeldJobs(client, held_jobs_key(parent, pid, jobs.namespace), settings.job_ttl_s)
    children = children_key(parent, jobs.namespace)
    with client.pipeline() as pipe:
        pipe.delete(held.key)  # a former process with this pid left nothing to hold
        pipe.sadd(children, pid)
        pipe.expire(children, settings.job_ttl_s)
        pipe.execute()
    return held


def _process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The state follows the command name in parentheses; Z: dead, not yet reaped.
            return stat.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_dead_children(
    client: redis.Redis, jobs: JobStore, reaper: JobReaper, parent_pid: int
) -> list[str]:
    """For every pool child of `parent_pid` that is gone: let the leases of the jobs it
    held lapse now and send them to the queue again. Returns the jobs sent."""
    key = children_key(parent_pid, jobs.namespace)
    released: list[str] = []
    for raw in client.smembers(key):
        pid = int(raw)
        if _process_alive(pid):
            continue
        held = HeldJobs(client, held_jobs_key(parent_pid, pid, jobs.namespace), settings.job_ttl_s)
        for job_id, owner in held.held().items():
            if not lapse_lease(jobs, job_id, owner):
                continue  # ended, canceled or taken over meanwhile
            log.warning("pool process %d died holding job %s; running it again now", pid, job_id)
            reaper.resend(job_id)
            released.append(job_id)
        held.clear()
        client.srem(key, pid)
    return released


@signals.worker_before_create_process.connect
def _release_jobs_of_dead_children(**_) -> None:
    """In the parent, before it starts a pool child: the first ones, and the replacement
    of one that died (the pool has already reaped it)."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        jobs = JobStore(
            client, settings.job_ttl_s, redeliver_after_s=settings.job_redeliver_after_s
        )
        reaper = JobReaper(jobs, partial(enqueue_edit, app), settings.job_redeliver_after_s)
        release_dead_children(client, jobs, reaper, os.getpid())
    except Exception:
        # Their leases lapse on their own, and the reaper sends them again then.
        log.exception("could not release the jobs of a dead pool process")
    finally:
        client.close()


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


def _setup_process(pool_child: bool = False) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    jobs = JobStore(client, settings.job_ttl_s, redeliver_after_s=settings.job_redeliver_after_s)
    held = _register_child(client, jobs) if pool_child else None
    # In every pool process, not the parent: the parent forks replacements, and a thread
    # there could hold a lock at the fork. A lock in Redis keeps it to one sweep a round.
    storage = open_storage(settings)
    reaper = JobReaper(
        jobs, partial(enqueue_edit, app), settings.job_redeliver_after_s, storage=storage
    )
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
        # The reason, with the model's path, goes to the log; jobs tell the client only
        # what kind of failure it was (their messages never name server paths).
        log.exception("loading the model from %s failed", model_path)
        engine, engine_error = None, f"the worker could not load it ({type(exc).__name__})"
    state.runner = EditRunner(
        engine,
        jobs,
        storage,
        max_batch=settings.max_batch,
        batch_window_ms=settings.batch_window_ms,
        lease_s=settings.job_lease_s,
        engine_error=engine_error,
        observer=MetricsObserver(),
        io_threads=settings.io_threads,
        prefetch_batches=settings.prefetch_batches,
        max_task_s=settings.task_soft_time_limit_s,
        held=held,
        notify=WebhookNotifier(app),
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


# The fine-tune task (served with `--queues train`, or `edits,train`).
import services.gpu_worker.finetune.task  # noqa: E402, F401
