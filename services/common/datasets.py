"""The dataset-run contract: what a client asks for, the run's record, and its storage keys.

A run is identified by a hash of its spec, so submitting the same spec again resumes the
same run: rows already in storage are skipped, nothing is generated twice.

Status changes are compare-and-set (as every JobStore operation is), so a cancel racing a
worker is never overwritten. Every (re)queue of a run starts a new *generation*; its tasks
carry that number, and tasks of an older generation (queued before a cancel and resume)
exit without work.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel, Field, model_validator

from services.common.jobs import utcnow

MAX_ROWS_PER_RUN = 1_000_000
ROWS_PER_CHUNK = 8
# A running or exporting run whose workers have not reported (a finished row, an export
# heartbeat) for this long is stale: posting its spec again re-enqueues what is missing.
# Far above the time one row takes, and above the datagen chunk task's soft time limit.
STALE_RUN_AFTER_S = 30 * 60


class RowInput(BaseModel):
    """A caption pair supplied by the client instead of the text synthesizer."""

    input_caption: str = Field(min_length=1, max_length=300)
    instruction: str = Field(min_length=1, max_length=300)
    output_caption: str = Field(min_length=1, max_length=300)
    category: str = Field("custom", max_length=64)
    edit_type: str = Field("custom", max_length=64)


class DatasetSpec(BaseModel):
    """Either `rows`, or `num_rows` captions from the synthesizer with `seed`."""

    rows: list[RowInput] | None = Field(None, max_length=10_000)
    num_rows: int | None = Field(None, ge=1, le=MAX_ROWS_PER_RUN)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    pairs_per_row: int = Field(4, ge=1, le=16)
    model: str | None = Field(None, description="SD 1.x hub id or directory; server default")
    num_inference_steps: int = Field(50, ge=1, le=200)
    resolution: int | None = Field(None, ge=64, le=1024, multiple_of=8)
    p_range: tuple[float, float] = (0.1, 0.9)
    text_guidance_range: tuple[float, float] = (7.5, 15.0)
    filter: bool = False
    clip_model: str | None = None

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        if (self.rows is None) == (self.num_rows is None):
            raise ValueError("give either rows or num_rows (with seed), not both")
        for name, (low, high), limit in (
            ("p_range", self.p_range, 1.0),
            ("text_guidance_range", self.text_guidance_range, 100.0),
        ):
            if not 0 <= low <= high <= limit:
                raise ValueError(f"{name} must be (min, max) with 0 <= min <= max <= {limit}")
        return self

    @property
    def total_rows(self) -> int:
        return len(self.rows) if self.rows is not None else self.num_rows

    def run_id(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]


class RunStatus(StrEnum):
    queued = "queued"
    running = "running"
    exporting = "exporting"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


RUN_FINISHED = frozenset({RunStatus.succeeded, RunStatus.failed, RunStatus.canceled})
RUN_ACTIVE = frozenset({RunStatus.queued, RunStatus.running, RunStatus.exporting})


class RunProgress(BaseModel):
    rows_done: int = 0
    rows_total: int
    pairs_generated: int = 0
    pairs_kept: int = 0


class RunError(BaseModel):
    code: str
    message: str


class DatasetRun(BaseModel):
    id: str
    status: RunStatus = RunStatus.queued
    spec: DatasetSpec
    progress: RunProgress
    # Bumped each time the run is (re)queued; tasks of another generation do nothing.
    generation: int = 0
    # Where the finished dataset is, as storage keys: the Parquet shards and the card.
    export_prefix: str | None = None
    export_files: list[str] = []
    error: RunError | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # The last sign of life: (re)queued, a row finished, an export heartbeat.
    heartbeat_at: datetime | None = None

    def last_seen(self) -> datetime:
        return self.heartbeat_at or self.started_at or self.created_at


def run_prefix(run_id: str) -> str:
    return f"datasets/{run_id}"


def row_key(run_id: str, index: int) -> str:
    return f"{run_prefix(run_id)}/rows/{index:07d}.json"


def pair_image_key(run_id: str, index: int, pair: int, which: str) -> str:
    return f"{run_prefix(run_id)}/images/{index:07d}_{pair:02d}_{which}.png"


def export_prefix(run_id: str) -> str:
    return f"{run_prefix(run_id)}/export"


def chunk_ranges(total: int, size: int = ROWS_PER_CHUNK) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


class RunNotFound(KeyError):
    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id


class RunTransitionRefused(Exception):
    """The run is not in a state that allows the change (e.g. canceling a finished run)."""

    def __init__(self, run: DatasetRun) -> None:
        super().__init__(f"dataset run {run.id} is {run.status} (generation {run.generation})")
        self.run = run


# Marks a row done once (SADD says whether it is new, so progress never counts a redone
# row twice), records the heartbeat and returns the rows done, atomically: a task
# interrupted half-way (soft time limit) never leaves the counts out of step with the set.
_ROW_DONE = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'generated', ARGV[2])
  redis.call('HINCRBY', KEYS[2], 'kept', ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[4])
return redis.call('SCARD', KEYS[1])
"""
# Lease renewal and release only by the holder.
_LEASE_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# Membership checks go to Redis in batches of this many rows.
_MEMBERSHIP_BATCH = 10_000


class RunStore:
    """Dataset runs in Redis: the record as JSON, rows done as a set with pair counts, the
    heartbeat as a timestamp, and the export lease."""

    def __init__(self, client: redis.Redis, ttl_s: int, namespace: str = "instructedit") -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.ns = f"{namespace}:dataset"
        self._row_done = client.register_script(_ROW_DONE)
        self._lease_renew = client.register_script(_LEASE_RENEW)
        self._lease_release = client.register_script(_LEASE_RELEASE)

    def _key(self, run_id: str, part: str = "record") -> str:
        return f"{self.ns}:{run_id}:{part}"

    @staticmethod
    def _heartbeat(raw: bytes | None) -> datetime | None:
        return datetime.fromtimestamp(float(raw), UTC) if raw is not None else None

    def _record(self, client, run_id: str) -> DatasetRun | None:
        """The stored record and heartbeat, without progress (``client``: the Redis client
        or a pipeline that is watching)."""
        raw = client.get(self._key(run_id))
        if raw is None:
            return None
        run = DatasetRun.model_validate_json(raw)
        run.heartbeat_at = self._heartbeat(client.get(self._key(run_id, "heartbeat")))
        return run

    def get(self, run_id: str) -> DatasetRun | None:
        run = self._record(self.redis, run_id)
        if run is None:
            return None
        counts = self.redis.hgetall(self._key(run_id, "counts"))
        run.progress.rows_done = self.redis.scard(self._key(run_id, "rows"))
        run.progress.pairs_generated = int(counts.get(b"generated", 0))
        run.progress.pairs_kept = int(counts.get(b"kept", 0))
        return run

    def _write(self, pipe, run: DatasetRun) -> None:
        pipe.set(self._key(run.id), run.model_dump_json(exclude={"heartbeat_at"}), ex=self.ttl_s)

    def beat(self, run_id: str, at: datetime | None = None) -> None:
        """Record a sign of life of the run's workers (``at``: now by default)."""
        when = (at or utcnow()).timestamp()
        self.redis.set(self._key(run_id, "heartbeat"), repr(when), ex=self.ttl_s)

    def _transact(
        self,
        run_id: str,
        change: Callable[[DatasetRun | None], DatasetRun | None],
        beat: bool = False,
    ) -> DatasetRun | None:
        """Read the record, let ``change`` decide the new one (None: write nothing), write
        it (and a heartbeat, with ``beat``) if neither the record nor the heartbeat changed
        meanwhile; retry otherwise."""
        keys = (self._key(run_id), self._key(run_id, "heartbeat"))
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(*keys)
                    updated = change(self._record(pipe, run_id))
                    if updated is None:
                        pipe.unwatch()
                        return None
                    pipe.multi()
                    self._write(pipe, updated)
                    if beat:
                        pipe.set(keys[1], repr(utcnow().timestamp()), ex=self.ttl_s)
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    time.sleep(0.001)

    def transition(
        self,
        run_id: str,
        allowed_from: Iterable[RunStatus],
        when: Callable[[DatasetRun], bool] | None = None,
        **changes: Any,
    ) -> DatasetRun:
        """Apply ``changes`` only if the run's status is in ``allowed_from`` (and
        ``when(run)`` holds, if given), atomically.

        Raises RunNotFound, or RunTransitionRefused with the current record. The returned
        record has no progress filled in (``get`` has it).
        """
        allowed = frozenset(allowed_from)

        def change(run: DatasetRun | None) -> DatasetRun:
            if run is None:
                raise RunNotFound(run_id)
            if run.status not in allowed or (when is not None and not when(run)):
                raise RunTransitionRefused(run)
            return run.model_copy(update=changes)

        return self._transact(run_id, change)

    def is_stale(self, run: DatasetRun, stale_after_s: float = STALE_RUN_AFTER_S) -> bool:
        """A running or exporting run whose workers stopped reporting (see
        ``STALE_RUN_AFTER_S``)."""
        if run.status not in (RunStatus.running, RunStatus.exporting):
            return False
        return utcnow() - run.last_seen() > timedelta(seconds=stale_after_s)

    def create_or_resume(
        self, spec: DatasetSpec, stale_after_s: float = STALE_RUN_AFTER_S
    ) -> tuple[DatasetRun, bool]:
        """The run for ``spec``, and whether it must be (re)queued: it is new, failed,
        canceled, or stale. A requeued run starts a new generation."""
        run_id = spec.run_id()
        requeued = False

        def change(existing: DatasetRun | None) -> DatasetRun | None:
            nonlocal requeued
            requeued = False
            resumable = existing is None or existing.status in (
                RunStatus.failed,
                RunStatus.canceled,
            )
            if not resumable and not self.is_stale(existing, stale_after_s):
                return None
            requeued = True
            return DatasetRun(
                id=run_id,
                spec=spec,
                progress=RunProgress(rows_total=spec.total_rows),
                generation=existing.generation + 1 if existing else 0,
                created_at=existing.created_at if existing else utcnow(),
            )

        # The heartbeat goes with the record: a concurrent post must not find the resumed
        # run still stale and requeue it once more.
        self._transact(run_id, change, beat=True)
        run = self.get(run_id)
        if run is None:  # expired in between; a new record is one retry away
            return self.create_or_resume(spec, stale_after_s)
        return run, requeued

    def row_done(self, run_id: str, index: int, generated: int, kept: int) -> int:
        """Mark a row finished; returns how many distinct rows are finished."""
        keys = [self._key(run_id, part) for part in ("rows", "counts", "heartbeat")]
        args = [index, generated, kept, self.ttl_s, repr(utcnow().timestamp())]
        return int(self._row_done(keys=keys, args=args))

    def missing_rows(self, run_id: str, indices: Iterable[int]) -> list[int]:
        """Those of ``indices`` that are not marked finished, in order."""
        indices = list(indices)
        missing: list[int] = []
        key = self._key(run_id, "rows")
        for start in range(0, len(indices), _MEMBERSHIP_BATCH):
            batch = indices[start : start + _MEMBERSHIP_BATCH]
            flags = self.redis.smismember(key, batch)
            missing += [index for index, done in zip(batch, flags, strict=True) if not done]
        return missing

    def chunks_to_enqueue(self, run: DatasetRun) -> list[tuple[int, int]]:
        """The chunks of a (re)queued run that still have rows to make. When none has,
        the last chunk alone: its task finds nothing to make and moves the run on to its
        export."""
        chunks = chunk_ranges(run.spec.total_rows)
        missing = set(self.missing_rows(run.id, range(run.spec.total_rows)))
        pending = [c for c in chunks if any(i in missing for i in range(*c))]
        return pending or chunks[-1:]

    # The export lease: one export of a run at a time, even when the broker redelivers the
    # export task while the first delivery still runs (it outlasts the visibility timeout).
    def acquire_lease(self, run_id: str, name: str, token: str, ttl_s: int) -> bool:
        return bool(self.redis.set(self._key(run_id, f"lease:{name}"), token, nx=True, ex=ttl_s))

    def renew_lease(self, run_id: str, name: str, token: str, ttl_s: int) -> bool:
        key = self._key(run_id, f"lease:{name}")
        return bool(self._lease_renew(keys=[key], args=[token, ttl_s]))

    def release_lease(self, run_id: str, name: str, token: str) -> None:
        self._lease_release(keys=[self._key(run_id, f"lease:{name}")], args=[token])
