"""Prometheus metrics of the edit worker, for its prefork pool.

Jobs run in pool children, and Prometheus scrapes one port per worker: the Celery parent
serves `/metrics` (`start_metrics_server`, at `worker_init`) and the children write their
samples to files that it sums (prometheus_client's multiprocess mode). The directory is
`$PROMETHEUS_MULTIPROC_DIR/gpu-worker-<parent pid>`, or a temporary one when that variable
is unset; it is made fresh at start, so samples of an earlier run never leak in.

Every `observe_*` function is safe to call anywhere (no server, tests, a solo pool) and
never raises: a metrics fault must not fail a job.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from services.common.jobs import EditJob, JobStatus

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600, 900)
STEPS_PER_SECOND_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500)


class _Metrics:
    def __init__(self) -> None:
        self.queue_wait = Histogram(
            "instructedit_worker_queue_wait_seconds",
            "Time a job waited between its submission and a worker starting it.",
            buckets=QUEUE_WAIT_BUCKETS,
        )
        self.job_duration = Histogram(
            "instructedit_worker_job_duration_seconds",
            "Time from a worker starting a job to its end (input, model, outputs), by status.",
            ["status"],
            buckets=DURATION_BUCKETS,
        )
        self.engine_duration = Histogram(
            "instructedit_worker_engine_seconds",
            "Time a job spent in the edit engine (denoising and decoding), by status.",
            ["status"],
            buckets=DURATION_BUCKETS,
        )
        self.steps_per_second = Histogram(
            "instructedit_worker_steps_per_second",
            "Denoising steps per second of engine time, per job.",
            buckets=STEPS_PER_SECOND_BUCKETS,
        )
        self.failures = Counter(
            "instructedit_worker_job_failures",
            "Jobs that ended failed, by error code.",
            ["code"],
        )
        self.unet_recompiles = Counter(
            "instructedit_unet_recompiles",
            "UNet graphs torch.compile compiled after the worker's warm-up (each one a "
            "pause of seconds to minutes for the batch that met a shape warm-up missed).",
        )
        # One series per pool process (multiprocess mode adds a `pid` label), dropped when
        # the process exits.
        gauge = functools.partial(Gauge, labelnames=["device"], multiprocess_mode="liveall")
        self.gpu_allocated = gauge(
            "instructedit_worker_gpu_memory_allocated_bytes",
            "GPU memory held by tensors of this process (torch.cuda.memory_allocated).",
        )
        self.gpu_reserved = gauge(
            "instructedit_worker_gpu_memory_reserved_bytes",
            "GPU memory reserved by this process's caching allocator.",
        )
        self.gpu_peak = gauge(
            "instructedit_worker_gpu_memory_peak_allocated_bytes",
            "Peak GPU memory held by tensors of this process since it started.",
        )

    def unregister(self) -> None:
        for collector in vars(self).values():
            REGISTRY.unregister(collector)


_lock = threading.Lock()
_metrics: _Metrics | None = None


def _get() -> _Metrics:
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = _Metrics()
        return _metrics


def _never_raise(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:
            log.warning("recording metrics in %s failed", fn.__name__, exc_info=True)
            return None

    return wrapper  # type: ignore[return-value]


def _prepare_multiprocess_dir() -> Path:
    base = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if base:
        directory = Path(base) / f"gpu-worker-{os.getpid()}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    else:
        directory = Path(tempfile.mkdtemp(prefix="instructedit-worker-metrics-"))
    owner = os.getpid()

    def remove() -> None:
        # Forked children inherit atexit handlers; only the parent that made it cleans up.
        if os.getpid() == owner:
            shutil.rmtree(directory, ignore_errors=True)

    atexit.register(remove)
    return directory


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serve `/metrics` on `port` for this process and every process forked from it.

    Call once, in the Celery parent before the pool starts (`worker_init`). Port 0 turns
    metrics off; a port already taken is logged and the worker runs on without them.
    """
    global _metrics
    if port == 0:
        log.info("worker metrics are off (INSTRUCTEDIT_WORKER_METRICS_PORT=0)")
        return
    directory = _prepare_multiprocess_dir()
    # Samples go to files under `directory` from now on, in this process and its children
    # (they inherit the environment); metrics made before switching are made again.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    with _lock:
        values.ValueClass = values.get_value_class()
        if _metrics is not None:
            _metrics.unregister()
            _metrics = None
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    try:
        _start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        log.warning("worker metrics server not started on %s:%d: %s", addr, port, exc)
    else:
        log.info("worker metrics on http://%s:%d/metrics", addr, port)
    from celery import signals

    signals.worker_process_shutdown.connect(_forget_exiting_process, weak=False)
    _get()  # the unlabelled series exist (at zero) before the first job


def _forget_exiting_process(**_: Any) -> None:
    """Drop the per-process gauges of a pool child that exits (its counters stay summed)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        mark_process_dead(os.getpid(), directory)


@_never_raise
def observe_job_started(job: EditJob) -> None:
    """A worker started `job` (its record has `started_at`): record its queue wait."""
    if job.started_at is None:
        return
    waited = (job.started_at - job.created_at).total_seconds()
    _get().queue_wait.observe(max(0.0, waited))


@_never_raise
def observe_job_finished(job: EditJob, engine_seconds: float) -> None:
    """`job` ended (its final record); `engine_seconds` is the time it spent in the engine.

    Records its duration by final status, its error code when it failed, and its
    denoising speed (`progress.step / engine_seconds`).
    """
    metrics = _get()
    status = str(job.status.value if isinstance(job.status, JobStatus) else job.status)
    if job.started_at is not None and job.finished_at is not None:
        duration = (job.finished_at - job.started_at).total_seconds()
    else:
        duration = engine_seconds
    metrics.job_duration.labels(status).observe(max(0.0, duration))
    if engine_seconds > 0:
        metrics.engine_duration.labels(status).observe(engine_seconds)
        if job.progress.step > 0:
            metrics.steps_per_second.observe(job.progress.step / engine_seconds)
    if job.status == JobStatus.failed:
        metrics.failures.labels(job.error.code if job.error else "unknown").inc()


@_never_raise
def observe_unet_recompiles(count: int) -> None:
    """The compiled UNet compiled `count` new graphs after warm-up (the engine logs them)."""
    if count > 0:
        _get().unet_recompiles.inc(count)


@_never_raise
def observe_gpu_memory() -> None:
    """Record this process's CUDA memory; nothing where CUDA is not in use.

    Never initialises CUDA (the Celery parent must not), and never imports torch.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    metrics = _get()
    for index in range(torch.cuda.device_count()):
        device = str(index)
        metrics.gpu_allocated.labels(device).set(torch.cuda.memory_allocated(index))
        metrics.gpu_reserved.labels(device).set(torch.cuda.memory_reserved(index))
        metrics.gpu_peak.labels(device).set(torch.cuda.max_memory_allocated(index))


class MetricsObserver:
    """An EditRunner observer (`observer=MetricsObserver()`) that records every job.

    With batching, each job of a batch is given the batch's engine time, so its steps per
    second are the speed that job saw.
    """

    def job_started(self, job: EditJob) -> None:
        observe_job_started(job)

    def job_finished(self, job: EditJob, engine_seconds: float) -> None:
        observe_job_finished(job, engine_seconds)
        observe_gpu_memory()
