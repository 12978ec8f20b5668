"""What the datagen tasks do, without Celery: plan a run, make a chunk of its rows,
export it.

``celery_worker`` binds these to Celery tasks (time limits, retries, failure records);
the tests call them directly with a real ``RunStore``, storage and broker.

A chunk task works row by row (a row is the unit of work: stored rows are skipped) and
stops at a row boundary when

* the run is no longer running in the task's generation (canceled, failed, or resumed as
  a newer generation): it exits;
* the worker is shutting down, or the next row would end past the task's soft time limit:
  it enqueues its remaining rows as a new task of the same generation and returns;
* the soft time limit interrupts a row anyway: the same, the interrupted row is made
  again by the new task; a row interrupted ``MAX_STALLS`` times in a row fails the run.

The API queues one planning task per (re)queued run, whatever its size; the planning task
enqueues the run's chunk tasks (those with rows still to make), recording how far it got
so that a planning task stopped half-way (time limit, shutdown, redelivery) goes on from
there, and stops once the run is canceled or moved to another generation.

The chunk task that finds every row of the run done moves it to ``exporting`` and
enqueues its export; or, when the run kept no pair at all (a CLIP filter nothing passed),
to ``failed`` with ``no_pairs_kept``: an empty export would not load (``datasets``
refuses empty splits). The export needs no model (it copies the stored PNGs), holds a lease
so that a redelivered export task does not run beside it, and publishes the run as
``succeeded`` only if the run is still exporting in its generation: a cancel during the
export wins.

Errors a run records never carry an exception's text (a model's path, a storage path):
a fixed message, at most with the exception's type; the detail goes to the log.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import redis
from celery.exceptions import SoftTimeLimitExceeded

from services.common.datasets import (
    DATAGEN_PLAN_TASK,
    RUN_ACTIVE,
    DatasetRun,
    RunError,
    RunNotFound,
    RunRowsMissing,
    RunStatus,
    RunStore,
    RunTransitionRefused,
)
from services.common.jobs import utcnow
from services.common.queues import DATAGEN_CHUNK_TASK, DATAGEN_EXPORT_TASK
from services.common.storage import ObjectNotFound, Storage, StorageError
from services.datagen.builder import DatasetBuilder, clip_filter_for, generator_for, model_name

log = logging.getLogger("instructedit.datagen")

# The tasks' own Celery time limits (the shared edit-task limits would cut a paper-sized
# export short). A chunk stops at a row boundary before its soft limit, so the soft limit
# only fires on a row that overran; the hard limit only on a task stuck past that.
CHUNK_SOFT_TIME_LIMIT_S = 25 * 60
CHUNK_TIME_LIMIT_S = CHUNK_SOFT_TIME_LIMIT_S + 2 * 60
# The planning task: enqueueing a million-row run's 125,000 chunk tasks takes about a
# minute; one stopped by its soft limit enqueues itself again and goes on.
PLAN_SOFT_TIME_LIMIT_S = 10 * 60
PLAN_TIME_LIMIT_S = PLAN_SOFT_TIME_LIMIT_S + 60
# Chunk tasks the planning task sends between records of its position and checks of the
# run (canceled? the worker shutting down?).
PLAN_CHECK_EVERY = 200
# A copy of the stored PNGs: ~12k pairs (the paper's dataset) take minutes, not hours.
EXPORT_SOFT_TIME_LIMIT_S = 6 * 3600
EXPORT_TIME_LIMIT_S = EXPORT_SOFT_TIME_LIMIT_S + 5 * 60
# A chunk task does not start a row that it expects to end later than this (or a tenth of
# the limit, if less) before its soft time limit (its slowest row so far is the estimate).
ROW_BUDGET_MARGIN_S = 30
# Continuations in a row that finished no row before the soft time limit struck.
MAX_STALLS = 3
# Retries of a task whose Redis or storage is unreachable, 1, 2, 4 ... 60 s apart.
TRANSIENT_RETRIES = 6
# The export's lease on its run, renewed with each heartbeat.
EXPORT_LEASE_S = 120
EXPORT_HEARTBEAT_S = 10

# The error code of a run whose rows are all made but that kept no pair.
NO_PAIRS_KEPT = "no_pairs_kept"


def no_pairs_kept_message(rows: int, generated: int) -> str:
    return (
        f"no image pair was kept: the CLIP filter passed none of the {generated} candidate "
        f"pair(s) of the run's {rows} row(s); lower the spec's filter thresholds "
        "(min_caption_similarity, min_directional_similarity, min_image_similarity), "
        "raise candidates_per_row, or turn the filter off"
    )


# Send a datagen task: send(task name, args, kwargs).
Send = Callable[[str, list, dict], object]


def is_transient(exc: BaseException) -> bool:
    """An outage worth retrying the task for: Redis or the store unreachable (a missing
    object is not an outage)."""
    if isinstance(exc, ObjectNotFound):
        return False
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError | StorageError)


def _soft_limit_hit(exc: BaseException | None) -> bool:
    """Whether the soft time limit struck, perhaps wrapped by the code it interrupted (the
    model loader reports any failure as its own)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, SoftTimeLimitExceeded):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


class RunFailed(Exception):
    """The run cannot go on; the task's failure handler records ``code`` and ``message``."""

    def __init__(self, code: str, message: str) -> None:
        # Both as args: Celery pickles a task's exception, rebuilding it as cls(*args).
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ExportStopped(Exception):
    """The export stops without publishing anything (and is enqueued again if
    ``requeue``)."""

    def __init__(self, reason: str, requeue: bool = False) -> None:
        super().__init__(reason)
        self.requeue = requeue


@dataclass
class RunContext:
    """What the tasks work with."""

    runs: RunStore
    storage: Storage
    default_model: str
    device: str
    send: Send
    # True once the worker is shutting down: chunks hand their remaining rows back.
    draining: Callable[[], bool] = field(default=lambda: False)


def _is_current(
    run: DatasetRun | None, generation: int | None, statuses: Iterable[RunStatus]
) -> bool:
    return (
        run is not None
        and run.status in statuses
        and (generation is None or run.generation == generation)
    )


def fail_run(runs: RunStore, run_id: str, generation: int | None, code: str, message: str) -> bool:
    """Record a run as failed, unless it already ended or moved to another generation."""
    try:
        runs.transition(
            run_id,
            RUN_ACTIVE,
            when=lambda run: generation is None or run.generation == generation,
            status=RunStatus.failed,
            error=RunError(code=code, message=message),
            finished_at=utcnow(),
        )
    except (RunNotFound, RunTransitionRefused):
        return False
    log.error("dataset run %s failed: %s: %s", run_id, code, message)
    return True


def _continue(
    ctx: RunContext, run_id: str, start: int, stop: int, generation: int | None, stalls: int = 0
) -> None:
    ctx.send(
        DATAGEN_CHUNK_TASK, [run_id, start, stop], {"generation": generation, "stalls": stalls}
    )


def plan_run(ctx: RunContext, run_id: str, generation: int | None = None) -> int:
    """Enqueue the chunk tasks of a (re)queued run that have rows to make; returns how
    many this task sent. Goes on from where an earlier planning task of the generation
    stopped; stops when the run is no longer queued or running in ``generation``."""
    runs = ctx.runs
    run = runs.get(run_id)
    if not _is_current(run, generation, (RunStatus.queued, RunStatus.running)):
        log.info(
            "dataset run %s: planning has nothing to do (%s)",
            run_id,
            f"{run.status}, generation {run.generation}" if run else "no such run",
        )
        return 0
    generation = run.generation
    position = runs.plan_position(run_id, generation)
    sent = 0
    try:
        for start, stop in runs.chunks_to_enqueue(run, start=position):
            if sent and sent % PLAN_CHECK_EVERY == 0:
                runs.set_plan_position(run_id, generation, start)
                current = runs.get(run_id)
                if not _is_current(current, generation, (RunStatus.queued, RunStatus.running)):
                    log.info("dataset run %s changed while planned; planning stops", run_id)
                    return sent
                if ctx.draining():
                    log.info("worker shutting down: planning of dataset run %s requeued", run_id)
                    ctx.send(DATAGEN_PLAN_TASK, [run_id], {"generation": generation})
                    return sent
            position = start
            ctx.send(DATAGEN_CHUNK_TASK, [run_id, start, stop], {"generation": generation})
            sent += 1
            position = stop
    except SoftTimeLimitExceeded:
        # The chunk being sent may go twice: harmless, its rows are made once.
        runs.set_plan_position(run_id, generation, position)
        log.warning("planning of dataset run %s continues in a new task", run_id)
        ctx.send(DATAGEN_PLAN_TASK, [run_id], {"generation": generation})
        return sent
    runs.set_plan_position(run_id, generation, run.spec.total_rows)
    log.info("dataset run %s: %d chunk task(s) enqueued", run_id, sent)
    return sent


def _builder(ctx: RunContext, run: DatasetRun) -> DatasetBuilder:
    try:
        generator = generator_for(run.spec, ctx.default_model, ctx.device)
        clip = clip_filter_for(run.spec, ctx.device)
    except Exception as exc:
        if _soft_limit_hit(exc):
            raise SoftTimeLimitExceeded() from exc
        # The exception may name the model's path on this server: the log has it, the
        # run's record a fixed message.
        log.exception("dataset run %s: its model could not be loaded", run.id)
        raise RunFailed("model_unavailable", "the run's model could not be loaded") from exc
    return DatasetBuilder(
        run.id,
        run.spec,
        ctx.storage,
        generator,
        clip,
        row_at=lambda index: ctx.runs.input_row(run.id, index),
    )


def _start(ctx: RunContext, run: DatasetRun) -> DatasetRun:
    """The run as running, started by this task or another one; or as it is now."""
    if run.status != RunStatus.queued:
        return run
    try:
        return ctx.runs.transition(
            run.id,
            {RunStatus.queued},
            when=lambda current: current.generation == run.generation,
            status=RunStatus.running,
            started_at=utcnow(),
        )
    except RunTransitionRefused as refused:
        return refused.run  # another chunk started it, or a cancel came first


def _finish_rows(ctx: RunContext, run: DatasetRun, generation: int) -> None:
    """Move the run on to its export once all its rows are done (once: compare-and-set);
    fail it instead when it kept no pair."""
    current = ctx.runs.get(run.id)
    if current is None or current.progress.rows_done < run.spec.total_rows:
        return
    if current.progress.pairs_kept == 0:
        message = no_pairs_kept_message(run.spec.total_rows, current.progress.pairs_generated)
        fail_run(ctx.runs, run.id, generation, NO_PAIRS_KEPT, message)
        return
    try:
        ctx.runs.transition(
            run.id,
            {RunStatus.running},
            when=lambda latest: latest.generation == generation,
            status=RunStatus.exporting,
        )
    except RunTransitionRefused:
        return  # another chunk task got there first, or the run was canceled
    ctx.send(DATAGEN_EXPORT_TASK, [run.id], {"generation": generation})


@dataclass
class _Chunk:
    """A chunk task's progress, for the continuation when the soft time limit strikes."""

    run_id: str
    stop: int
    generation: int | None
    index: int  # the row in progress, or the next one
    done: int = 0  # rows this task finished


def generate_chunk(
    ctx: RunContext,
    run_id: str,
    start: int,
    stop: int,
    generation: int | None = None,
    stalls: int = 0,
    soft_limit_s: float | None = None,
) -> int:
    """Make rows [start, stop) of a run; returns how many rows this task finished.

    ``generation``: of the run when the task was enqueued (None, from an API older than
    generations: the current one); ``stalls``: continuations before this one that
    finished no row; ``soft_limit_s``: the task's soft time limit, to stop between rows in
    time.
    """
    chunk = _Chunk(run_id, stop, generation, index=start)
    try:
        _make_rows(ctx, chunk, soft_limit_s)
    except SoftTimeLimitExceeded:
        stalls = 0 if chunk.done else stalls + 1
        if stalls >= MAX_STALLS:
            raise RunFailed(
                "row_timeout",
                f"row {chunk.index} did not finish within the chunk task's soft time limit "
                f"({MAX_STALLS} tries)",
            ) from None
        log.warning(
            "soft time limit reached at row %d of dataset run %s; rows %d-%d continue in "
            "a new task",
            chunk.index,
            run_id,
            chunk.index,
            stop,
        )
        _continue(ctx, run_id, chunk.index, stop, chunk.generation, stalls)
    return chunk.done


def _make_rows(ctx: RunContext, chunk: _Chunk, soft_limit_s: float | None) -> None:
    clock = time.monotonic()
    runs, run_id, stop = ctx.runs, chunk.run_id, chunk.stop
    run = runs.get(run_id)
    if not _is_current(run, chunk.generation, (RunStatus.queued, RunStatus.running)):
        log.info(
            "dataset run %s: chunk %d-%d has nothing to do (%s)",
            run_id,
            chunk.index,
            stop,
            f"{run.status}, generation {run.generation}" if run else "no such run",
        )
        return
    generation = chunk.generation = run.generation
    run = _start(ctx, run)
    if not _is_current(run, generation, (RunStatus.running,)):
        return
    builder = None
    slowest = 0.0
    for index in runs.missing_rows(run_id, range(chunk.index, stop)):
        chunk.index = index
        if ctx.draining():
            log.info(
                "worker shutting down: rows %d-%d of dataset run %s go back to the queue",
                index,
                stop,
                run_id,
            )
            _continue(ctx, run_id, index, stop, generation)
            return
        elapsed = time.monotonic() - clock
        margin = min(ROW_BUDGET_MARGIN_S, (soft_limit_s or 0) / 10)
        if soft_limit_s and chunk.done and elapsed + slowest > soft_limit_s - margin:
            log.info(
                "rows %d-%d of dataset run %s continue in a new task (time limit)",
                index,
                stop,
                run_id,
            )
            _continue(ctx, run_id, index, stop, generation)
            return
        current = runs.get(run_id)
        if not _is_current(current, generation, (RunStatus.running,)):
            log.info(
                "dataset run %s is %s (generation %s); stopping",
                run_id,
                current and current.status,
                current and current.generation,
            )
            return
        if builder is None:
            builder = _builder(ctx, run)
        row_started = time.monotonic()
        try:
            outcome = builder.process_row(index)
        except RunRowsMissing as exc:
            log.error("dataset run %s: %s", run_id, exc)
            raise RunFailed(
                "rows_missing",
                f"row {index}: the run's caption rows are no longer stored; post its spec again",
            ) from exc
        except Exception as exc:
            if _soft_limit_hit(exc):
                raise SoftTimeLimitExceeded() from exc
            if is_transient(exc):
                raise
            log.exception("row %d of dataset run %s failed", index, run_id)
            raise RunFailed(
                "generation_failed", f"row {index} could not be made ({type(exc).__name__})"
            ) from exc
        runs.row_done(run_id, index, outcome.generated, outcome.kept)
        chunk.done += 1
        slowest = max(slowest, time.monotonic() - row_started)
    _finish_rows(ctx, run, generation)


class _ExportWatch:
    """Keeps an export's claim alive from a thread, every ``EXPORT_HEARTBEAT_S`` (also
    while the shards upload, when no row callback runs): renews the lease, records a
    heartbeat, and notes when the run stopped exporting in its generation. As the export's
    row callback it stops the export on that note, or when the worker shuts down."""

    def __init__(self, ctx: RunContext, run_id: str, generation: int, token: str) -> None:
        self.ctx = ctx
        self.run_id = run_id
        self.generation = generation
        self.token = token
        self.stopped: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="export-watch", daemon=True)

    def __enter__(self) -> _ExportWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        runs = self.ctx.runs
        while not self._done.wait(EXPORT_HEARTBEAT_S):
            try:
                run = runs.get(self.run_id)
                if not _is_current(run, self.generation, (RunStatus.exporting,)):
                    self.stopped = f"the run is {run.status if run else 'gone'}"
                elif not runs.renew_lease(self.run_id, "export", self.token, EXPORT_LEASE_S):
                    self.stopped = "the export lease was lost"
                else:
                    runs.beat(self.run_id)
            except Exception:
                # Redis away for a moment: the lease outlasts a few missed renewals.
                log.warning("export of dataset run %s: heartbeat failed", self.run_id)

    def __call__(self, index: int) -> None:
        if self.ctx.draining():
            raise ExportStopped("the worker is shutting down", requeue=True)
        if self.stopped is not None:
            raise ExportStopped(self.stopped)


def export_run(ctx: RunContext, run_id: str, generation: int | None = None) -> bool:
    """Export a run's stored rows and publish it as succeeded; returns whether it did."""
    runs = ctx.runs
    run = runs.get(run_id)
    if not _is_current(run, generation, (RunStatus.exporting,)):
        log.info(
            "dataset run %s: export has nothing to do (%s)",
            run_id,
            f"{run.status}, generation {run.generation}" if run else "no such run",
        )
        return False
    generation = run.generation
    token = uuid.uuid4().hex
    if not runs.acquire_lease(run_id, "export", token, EXPORT_LEASE_S):
        log.info("dataset run %s: another worker is exporting it", run_id)
        return False
    try:
        runs.beat(run_id)
        # No model: the card names the run's model, the pictures are already PNGs.
        builder = DatasetBuilder(
            run.id, run.spec, ctx.storage, model=model_name(run.spec, ctx.default_model)
        )
        progress = run.progress
        if progress.rows_done >= run.spec.total_rows and progress.pairs_kept == 0:
            # Reached only by an export enqueued before the check in _finish_rows.
            raise RunFailed(
                NO_PAIRS_KEPT,
                no_pairs_kept_message(run.spec.total_rows, progress.pairs_generated),
            )
        try:
            with _ExportWatch(ctx, run_id, generation, token) as watch:
                summary = builder.export(on_row=watch)
        except ExportStopped as stopped:
            log.info("export of dataset run %s stopped: %s", run_id, stopped)
            if stopped.requeue:
                ctx.send(DATAGEN_EXPORT_TASK, [run_id], {"generation": generation})
            return False
        except Exception as exc:
            if _soft_limit_hit(exc) or is_transient(exc):
                raise
            log.exception("export of dataset run %s failed", run_id)
            raise RunFailed("export_failed", f"the export failed ({type(exc).__name__})") from exc
        try:
            runs.transition(
                run_id,
                {RunStatus.exporting},
                when=lambda current: current.generation == generation,
                status=RunStatus.succeeded,
                export_prefix=summary.card_key.rsplit("/", 1)[0],
                export_files=[*summary.shard_keys, summary.card_key],
                finished_at=utcnow(),
            )
        except RunTransitionRefused as refused:
            log.info(
                "dataset run %s became %s during its export; left so", run_id, refused.run.status
            )
            return False
        return True
    finally:
        runs.release_lease(run_id, "export", token)
