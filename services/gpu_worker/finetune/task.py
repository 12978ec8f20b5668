"""The fine-tune task (FINETUNE_TASK on the `train` queue), run by the GPU worker.

A GPU worker serves training when started with the queue in its list:

    celery --app services.gpu_worker.celery_worker worker --queues train \
        --pool prefork --concurrency 1          # or --queues edits,train

A prefork child runs one task at a time, so a child that trains does not edit meanwhile
(its edit engine stays loaded beside the trainer's model: GPU memory for both).

What a task does, for fine-tune `id` at `generation`:

- claims it (queued -> running, compare-and-set on the generation; otherwise it exits);
- works in a temporary directory, after downloading the latest checkpoint stored under
  `finetunes/<id>/checkpoints/` (so a restart, or another worker, resumes from it);
- runs `run_finetune`: progress is recorded at most once a second (a heartbeat too);
  every checkpoint the trainer writes is uploaded (the older stored one deleted), and so
  are the latest validation renders (`finetunes/<id>/validation/step-N/`);
- stops (checkpointing first) when the fine-tune is canceled or requeued as a newer
  generation;
- on success uploads the LoRA to `finetunes/<id>/adapter/`, registers it as adapter
  `ft-<id[:12]>` owned by the fine-tune's key (location `storage:finetunes/<id>/adapter`),
  and ends succeeded with that `adapter`; on an error it ends failed with a fixed message
  (the detail, server paths included, goes to the log only).

Training outlasts the edit task's time limits: this task's limits are 7 days, and it is
acknowledged on receipt (acks_late=False), or the broker's visibility timeout would
deliver it again while it runs. A worker that dies leaves the fine-tune running without
heartbeats; posting the same request once it is stale (STALE_FINETUNE_AFTER_S) requeues
it, and the new task resumes from the stored checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

import redis
from celery import shared_task
from prometheus_client import CollectorRegistry

from services.common.adapters import AdapterInvalid, AdapterStore
from services.common.datasets import RunStatus, RunStore
from services.common.finetunes import (
    FinetuneError,
    FinetuneNotFound,
    FinetuneProgress,
    FinetuneStatus,
    FinetuneStore,
    FinetuneTransitionRefused,
    adapter_id_for,
    adapter_prefix,
    checkpoints_prefix,
    validation_prefix,
)
from services.common.jobs import utcnow
from services.common.queues import FINETUNE_TASK
from services.common.settings import Settings, get_settings
from services.common.storage import open_storage
from services.gpu_worker.finetune import storage_sync

log = logging.getLogger("instructedit.finetune")

TASK_TIME_LIMIT_S = 7 * 24 * 3600
PROGRESS_EVERY_S = 1.0
FAILED_MESSAGE = (
    "the fine-tune failed; post the same request again to resume from its last checkpoint"
)


def finetune_metrics_registry() -> CollectorRegistry | None:
    """Where the trainer's step and loss gauges go so that the worker's metrics port
    (INSTRUCTEDIT_WORKER_METRICS_PORT) shows them, or None when metrics are off.

    The worker serves `/metrics` in prometheus_client's multiprocess mode
    (`services.gpu_worker.metrics.start_metrics_server`): a pool child's samples go to
    files under PROMETHEUS_MULTIPROC_DIR, whatever registry a metric is registered in, and
    the parent's MultiProcessCollector sums them. So each run gets a registry of its own
    (registering the gauges twice in one process's REGISTRY would raise).
    """
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    return CollectorRegistry()


class _Failed(Exception):
    """A failure with a message fit for the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def dataset_source(settings: Settings, export_prefix: str) -> str:
    """The storage URL of a dataset run's export (what `load_edit_dataset` reads)."""
    return f"{settings.storage_url.rstrip('/')}/{export_prefix.strip('/')}"


class FinetuneRunner:
    """Runs one generation of a fine-tune (separate from Celery, for tests)."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None, storage=None):
        self.settings = settings
        self.redis = client or redis.Redis.from_url(settings.redis_url)
        self.store = FinetuneStore(self.redis, settings.job_ttl_s)
        self.runs = RunStore(self.redis, settings.job_ttl_s)
        self.storage = storage if storage is not None else open_storage(settings)
        self.adapters = AdapterStore(self.redis, self.storage)

    def run(self, finetune_id: str, generation: int) -> str:
        try:
            finetune = self.store.transition(
                finetune_id,
                {FinetuneStatus.queued},
                when=lambda f: f.generation == generation,
                status=FinetuneStatus.running,
                started_at=utcnow(),
                heartbeat_at=utcnow(),
            )
        except (FinetuneNotFound, FinetuneTransitionRefused) as exc:
            log.info("fine-tune %s generation %d not taken: %s", finetune_id, generation, exc)
            return "skipped"
        try:
            with tempfile.TemporaryDirectory(prefix=f"finetune-{finetune_id}-") as work:
                outcome = self._train(finetune, generation, Path(work))
        except _Failed as exc:
            log.warning("fine-tune %s failed: %s", finetune_id, exc.message)
            self._fail(finetune_id, generation, exc.code, exc.message)
            return "failed"
        except Exception:
            log.exception("fine-tune %s generation %d failed", finetune_id, generation)
            self._fail(finetune_id, generation, "finetune_failed", FAILED_MESSAGE)
            return "failed"
        return outcome

    def _fail(self, finetune_id: str, generation: int, code: str, message: str) -> None:
        with contextlib.suppress(FinetuneNotFound, FinetuneTransitionRefused):
            self.store.transition(
                finetune_id,
                {FinetuneStatus.running},
                when=lambda f: f.generation == generation,
                status=FinetuneStatus.failed,
                error=FinetuneError(code=code, message=message),
                finished_at=utcnow(),
            )

    def _train(self, finetune, generation: int, work: Path) -> str:
        from services.gpu_worker.finetune.train import run_finetune

        finetune_id = finetune.id
        request = finetune.request
        run = self.runs.get(request.dataset)
        if run is None or run.owner != finetune.owner or run.status != RunStatus.succeeded:
            raise _Failed("dataset_unavailable", "the dataset run is gone or did not succeed")
        if not run.export_prefix:
            raise _Failed("dataset_unavailable", "the dataset run has no export")
        source = dataset_source(self.settings, run.export_prefix)
        base = request.base_model or self.settings.model
        config = request.config
        dest = work / "out"
        dest.mkdir()
        resumed = storage_sync.download_latest_checkpoint(
            self.storage, checkpoints_prefix(finetune_id), dest
        )
        if resumed is not None:
            log.info("fine-tune %s resumes from its checkpoint at step %d", finetune_id, resumed)
        last_report = [0.0]
        stop = [False]

        def on_validation(step: int, pngs: list[str]) -> None:
            updated = self.store.report_progress(
                finetune_id, generation, validation_keys=pngs, validation_step=step
            )
            if updated is None:
                stop[0] = True

        sync_outputs = storage_sync.OutputSync(
            self.storage,
            dest,
            checkpoints_prefix(finetune_id),
            validation_prefix(finetune_id),
            checkpoint_step=resumed,
            on_validation=on_validation,
        )

        def on_progress(progress) -> None:
            now = time.monotonic()
            if progress.step < progress.max_steps and now - last_report[0] < PROGRESS_EVERY_S:
                return
            last_report[0] = now
            updated = self.store.report_progress(
                finetune_id,
                generation,
                FinetuneProgress(
                    step=progress.step,
                    total=progress.max_steps,
                    loss=_finite(progress.loss),
                    eta_s=_finite(progress.eta_s),
                    images_per_s=_finite(progress.images_per_s),
                ),
            )
            if updated is None:
                stop[0] = True

        def should_stop() -> bool:
            # After the step's checkpoint and validation (the trainer calls it last).
            sync_outputs()
            if not stop[0]:
                current = self.store.get(finetune_id)
                stop[0] = (
                    current is None
                    or current.status != FinetuneStatus.running
                    or current.generation != generation
                )
            return stop[0]

        result = run_finetune(
            config,
            source,
            base,
            dest,
            on_progress=on_progress,
            should_stop=should_stop,
            metrics=finetune_metrics_registry(),
        )
        sync_outputs()
        if result.stopped:
            log.info(
                "fine-tune %s generation %d stopped at step %d",
                finetune_id,
                generation,
                result.steps,
            )
            return "stopped"
        if result.adapter_dir is None:
            raise RuntimeError("the trainer made no adapter")
        prefix = adapter_prefix(finetune_id)
        self.storage.delete_prefix(prefix + "/")
        storage_sync.upload_dir(self.storage, result.adapter_dir, prefix)
        adapter = self._register(finetune, prefix)
        try:
            self.store.transition(
                finetune_id,
                {FinetuneStatus.running},
                when=lambda f: f.generation == generation,
                status=FinetuneStatus.succeeded,
                adapter=adapter,
                progress=FinetuneProgress(
                    step=result.steps,
                    total=config.max_steps,
                    loss=_finite(result.final_loss),
                    eta_s=0.0,
                    images_per_s=finetune.progress.images_per_s,
                ),
                finished_at=utcnow(),
                heartbeat_at=utcnow(),
            )
        except (FinetuneNotFound, FinetuneTransitionRefused) as exc:
            log.info("fine-tune %s finished but was changed meanwhile: %s", finetune_id, exc)
            return "stopped"
        log.info("fine-tune %s succeeded: adapter %s", finetune_id, adapter)
        return "succeeded"

    def _register(self, finetune, prefix: str) -> str:
        adapter_id = adapter_id_for(finetune.id)
        location = f"storage:{prefix}"
        existing = self.adapters.get(adapter_id)
        if existing is not None:
            # This fine-tune's own, from an earlier try that ended before it was recorded.
            if existing.owner != finetune.owner or existing.storage_prefix != prefix:
                raise RuntimeError(f"adapter id {adapter_id} is taken by another adapter")
            self.adapters.remove(adapter_id)
        try:
            self.adapters.register(
                location, f"fine-tune {finetune.id}", adapter_id=adapter_id, owner=finetune.owner
            )
        except AdapterInvalid:
            log.exception("registering the adapter of fine-tune %s failed", finetune.id)
            raise
        return adapter_id


def _finite(value: float | None) -> float | None:
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return None
    return float(value)


@shared_task(
    name=FINETUNE_TASK,
    acks_late=False,
    reject_on_worker_lost=False,
    soft_time_limit=TASK_TIME_LIMIT_S,
    time_limit=TASK_TIME_LIMIT_S + 600,
)
def finetune(finetune_id: str, generation: int) -> str:
    return FinetuneRunner(get_settings()).run(finetune_id, generation)
