"""The dataset-run contract: what a client asks for, the run's record, and its storage keys.

A run is identified by a hash of its spec, so submitting the same spec again resumes the
same run: rows already in storage are skipped, nothing is generated twice.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel, Field, model_validator

from services.common.jobs import utcnow

MAX_ROWS_PER_RUN = 1_000_000
ROWS_PER_CHUNK = 8


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
    # Where the finished dataset is, as storage keys: the Parquet shards and the card.
    export_prefix: str | None = None
    export_files: list[str] = []
    error: RunError | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


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


class RunStore:
    """Dataset runs in Redis: the record as JSON, row and chunk completion as sets (SADD
    tells whether a row is new, so progress never counts a redone row twice)."""

    def __init__(self, client: redis.Redis, ttl_s: int, namespace: str = "instructedit") -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.ns = f"{namespace}:dataset"

    def _key(self, run_id: str, part: str = "record") -> str:
        return f"{self.ns}:{run_id}:{part}"

    def get(self, run_id: str) -> DatasetRun | None:
        raw = self.redis.get(self._key(run_id))
        if raw is None:
            return None
        run = DatasetRun.model_validate_json(raw)
        counts = self.redis.hgetall(self._key(run_id, "counts"))
        run.progress.rows_done = self.redis.scard(self._key(run_id, "rows"))
        run.progress.pairs_generated = int(counts.get(b"generated", 0))
        run.progress.pairs_kept = int(counts.get(b"kept", 0))
        return run

    def save(self, run: DatasetRun) -> None:
        self.redis.set(self._key(run.id), run.model_dump_json(), ex=self.ttl_s)

    def create_or_resume(self, spec: DatasetSpec) -> tuple[DatasetRun, bool]:
        """The run for `spec`, and whether it must be (re)queued."""
        run_id = spec.run_id()
        existing = self.get(run_id)
        if existing and existing.status not in (RunStatus.failed, RunStatus.canceled):
            return existing, False
        run = DatasetRun(
            id=run_id,
            spec=spec,
            progress=RunProgress(rows_total=spec.total_rows),
            created_at=existing.created_at if existing else utcnow(),
        )
        self.redis.delete(self._key(run_id, "chunks"))
        self.save(run)
        return run, True

    def update(self, run_id: str, **changes: Any) -> DatasetRun | None:
        run = self.get(run_id)
        if run is None:
            return None
        run = run.model_copy(update=changes)
        self.save(run)
        return run

    def row_done(self, run_id: str, index: int, generated: int, kept: int) -> None:
        if self.redis.sadd(self._key(run_id, "rows"), index):
            self.redis.hincrby(self._key(run_id, "counts"), "generated", generated)
            self.redis.hincrby(self._key(run_id, "counts"), "kept", kept)
        for part in ("rows", "counts"):
            self.redis.expire(self._key(run_id, part), self.ttl_s)

    def chunk_done(self, run_id: str, start: int) -> int:
        """Mark a chunk finished; returns how many distinct chunks are finished."""
        key = self._key(run_id, "chunks")
        self.redis.sadd(key, start)
        self.redis.expire(key, self.ttl_s)
        return self.redis.scard(key)
