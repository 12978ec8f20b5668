"""The dataset-run contract: what a client asks for, the run's record, and its storage keys.

A run belongs to the API key that created it and is identified by a hash of that key's id
and the spec, so the same key submitting the same spec again resumes the same run (rows
already in storage are skipped, nothing is generated twice), while two keys never share
a run.

Caption rows a client supplies (``rows``) are stored apart from the run's record, one
Redis list element per row: the record keeps their count and hash, and a worker reads the
row it makes by index (LINDEX) without parsing the others.

Status changes are compare-and-set (as every JobStore operation is), so a cancel racing a
worker is never overwritten. Every (re)queue of a run starts a new *generation*; its tasks
carry that number, and tasks of an older generation (queued before a cancel and resume)
exit without work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.common.jobs import utcnow
from services.common.listing import owner_index_key, page

# The task the API queues for a (re)queued run: it enqueues the run's chunk tasks on a
# datagen worker, so that a post's time does not grow with the run's size.
from services.common.queues import DATAGEN_PLAN_TASK  # noqa: F401  (re-exported)
from services.common.redis_cas import compare_and_set
from services.common.schedulers import Scheduler

MAX_ROWS_PER_RUN = 1_000_000
# Caption rows a spec may give itself (``rows``).
MAX_SPEC_ROWS = 10_000
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


# The largest JSON body a spec needs: MAX_SPEC_ROWS rows with every caption at its maximum
# length (a row is ~1,100 bytes of compact JSON with ASCII captions; the allowance covers
# indentation and some non-ASCII text), plus the other fields. The API refuses bigger
# bodies (413 payload_too_large) before parsing them.
MAX_ROW_JSON_BYTES = 1_600
MAX_SPEC_BYTES = MAX_SPEC_ROWS * MAX_ROW_JSON_BYTES + 64 * 1024


# Candidates per row when the filter is on and the spec does not say: InstructPix2Pix's
# generate_img_dataset.py --n-samples 100.
DEFAULT_FILTERED_CANDIDATES = 100
MAX_CANDIDATES_PER_ROW = 200
# Samplers a run may name (services.common.schedulers); LCM needs an LCM model.
DATAGEN_SCHEDULERS = tuple(name for name in Scheduler if name is not Scheduler.lcm)


class _SpecOptions(BaseModel):
    """What a spec says besides the rows it gives (shared by the spec a client posts and
    the spec a run's record keeps). Defaults are InstructPix2Pix's image-side recipe
    (docs/DATAGEN.md, "Image pairs: InstructPix2Pix's recipe")."""

    num_rows: int | None = Field(None, ge=1, le=MAX_ROWS_PER_RUN)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    pairs_per_row: int = Field(
        4,
        ge=1,
        le=16,
        description="Image pairs kept per caption row at most (InstructPix2Pix: max_out_samples 4)",
    )
    candidates_per_row: int | None = Field(
        None,
        ge=1,
        le=MAX_CANDIDATES_PER_ROW,
        description="Candidate pairs a row may generate to find its pairs_per_row "
        "passing ones (generation stops once enough pass); null: 100 with the filter on "
        "(InstructPix2Pix's n_samples), pairs_per_row with it off",
    )
    candidate_batch_size: int = Field(
        8,
        ge=1,
        le=64,
        description="Candidates denoised together in one UNet batch (4 UNet rows each)",
    )
    model: str | None = Field(
        None,
        description="The text-to-image model: one of the ids the server allows "
        "(its `datagen_models` setting); null: the server's default",
    )
    scheduler: Scheduler | None = Field(
        Scheduler.euler_ancestral,
        description="The sampler (InstructPix2Pix: Euler ancestral); null: the model's "
        "own scheduler",
    )
    num_inference_steps: int = Field(
        100, ge=1, le=200, description="Denoising steps (InstructPix2Pix: 100)"
    )
    resolution: int | None = Field(None, ge=64, le=1024, multiple_of=8)
    p_range: tuple[float, float] = Field(
        (0.1, 0.9),
        description="Range of the Prompt-to-Prompt fraction p of the steps whose "
        "self-attention maps the edited image takes from the input image",
    )
    text_guidance_range: tuple[float, float] = Field(
        (7.5, 15.0), description="Range of the classifier-free text guidance scale"
    )
    cross_attention_fraction: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Fraction of the steps whose cross-attention maps (shared and swapped "
        "words, the conditional half only) the edited image takes from the input image; "
        "null or 0: none (InstructPix2Pix copies self-attention only)",
    )
    negative_prompt: str | None = Field(
        None,
        max_length=300,
        description="Negative prompt of both images; null: none (InstructPix2Pix)",
    )
    filter: bool = Field(True, description="CLIP-filter the candidates (InstructPix2Pix does)")
    clip_model: str | None = Field(
        None,
        description="The CLIP model of the filter: one of the ids the server allows "
        "(its `datagen_clip_models` setting); null: the server's default",
    )
    min_caption_similarity: float = Field(
        0.2,
        ge=-1.0,
        le=1.0,
        description="Filter: least CLIP similarity of each image and its caption "
        "(clip_sim_0, clip_sim_1)",
    )
    min_directional_similarity: float = Field(
        0.2,
        ge=-1.0,
        le=1.0,
        description="Filter: least directional CLIP similarity (clip_sim_dir)",
    )
    min_image_similarity: float = Field(
        0.75,
        ge=-1.0,
        le=1.0,
        description="Filter: least CLIP similarity of the two images (clip_sim_image)",
    )

    @model_validator(mode="after")
    def _check_candidates(self) -> _SpecOptions:
        if self.candidates_per_row is not None and self.candidates_per_row < self.pairs_per_row:
            raise ValueError("candidates_per_row must be >= pairs_per_row")
        if self.scheduler is Scheduler.lcm:
            raise ValueError(f"scheduler must be one of {', '.join(DATAGEN_SCHEDULERS)} (or null)")
        return self

    @property
    def candidates(self) -> int:
        """Candidates per row: the spec's, or 100 with the filter on and pairs_per_row
        with it off."""
        if self.candidates_per_row is not None:
            return self.candidates_per_row
        return (
            max(DEFAULT_FILTERED_CANDIDATES, self.pairs_per_row)
            if self.filter
            else (self.pairs_per_row)
        )


class _TextOptions(BaseModel):
    """How the text synthesizer writes the caption rows of a `num_rows` run (and which
    edit types a `captions` run maps to)."""

    edit_types: list[str] | None = Field(
        None,
        min_length=1,
        description="Edit types to draw from; null: every type enabled by default (exact "
        "lettering, text_print, only when named). docs/DATAGEN.md lists them",
    )
    max_attributes: int = Field(
        2,
        ge=1,
        le=6,
        description="Most attribute words (color, material, style...) before the product "
        "noun of a synthesized caption, so Stable Diffusion binds them all",
    )

    @field_validator("edit_types")
    @classmethod
    def _known_edit_types(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        # The edit types are the text synthesizer's (pure Python, no model).
        from services.datagen.text import resolve_edit_types

        return [edit.name for edit in resolve_edit_types(names)]


class CaptionIn(BaseModel):
    """One of the client's own product captions, with what it knows about the product."""

    model_config = ConfigDict(extra="forbid")

    caption: str = Field(min_length=1, max_length=300)
    category: str | None = Field(None, max_length=64, description="A catalog category")
    product: str | None = Field(None, max_length=64, description="The catalog noun it shows")
    attributes: dict[str, str] = Field(
        default_factory=dict, description="Attribute slot -> value, e.g. {'color': 'black'}"
    )
    id: str | int | None = Field(None, description="The client's id, echoed in the rows")


# Captions a spec may give; each makes up to edits_per_caption rows, at most
# MAX_SPEC_ROWS in all.
MAX_SPEC_CAPTIONS = 2_000


class RunSpec(_SpecOptions, _TextOptions):
    """A run's spec as its record keeps (and the API shows) it: rows the client gave are
    stored apart, here only their count and the SHA-256 of their canonical JSON."""

    rows_count: int | None = None
    rows_sha256: str | None = None

    @property
    def total_rows(self) -> int:
        return self.rows_count if self.rows_count is not None else self.num_rows


class DatasetSpec(_SpecOptions, _TextOptions):
    """One of: `rows` (caption rows written by the client), `num_rows` caption rows from
    the synthesizer with `seed`, or `captions` (the client's own product captions, which
    the synthesizer maps to edit instructions and output captions: the paper's mode)."""

    rows: list[RowInput] | None = Field(None, min_length=1, max_length=MAX_SPEC_ROWS)
    captions: list[str | CaptionIn] | None = Field(
        None,
        min_length=1,
        max_length=MAX_SPEC_CAPTIONS,
        description="Your own product captions (text, or objects with optional category, "
        "product and attributes); each is mapped to up to edits_per_caption rows of "
        "different edit types. Captions that cannot be mapped are refused with the reasons",
    )
    edits_per_caption: int = Field(3, ge=1, le=10, description="Rows per caption (captions)")

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        given = [name for name in ("rows", "num_rows", "captions") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError("give exactly one of rows, num_rows (with seed) or captions")
        if self.captions and len(self.captions) * self.edits_per_caption > MAX_SPEC_ROWS:
            raise ValueError(f"captions x edits_per_caption must be at most {MAX_SPEC_ROWS} rows")
        for name, (low, high), limit in (
            ("p_range", self.p_range, 1.0),
            ("text_guidance_range", self.text_guidance_range, 100.0),
        ):
            if not 0 <= low <= high <= limit:
                raise ValueError(f"{name} must be (min, max) with 0 <= min <= max <= {limit}")
        return self

    @property
    def total_rows(self) -> int:
        if self.captions is not None:
            return len(self.captions) * self.edits_per_caption  # at most
        return len(self.rows) if self.rows is not None else self.num_rows

    def with_rows(self, rows: list[RowInput]) -> DatasetSpec:
        """This spec with its captions replaced by the rows they were mapped to."""
        return self.model_copy(update={"captions": None, "rows": rows})

    def run_id(self, owner: str | None = None) -> str:
        """The run's id: a hash of the owner's key id and the spec (None: the spec alone,
        for local runs without an API)."""
        content = self.model_dump(mode="json")
        if owner is not None:
            content = {"owner": owner, "spec": content}
        canonical = json.dumps(content, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]

    def row_lines(self) -> list[str]:
        """The given rows as canonical JSON, one string per row (empty without rows)."""
        return [json.dumps(row.model_dump(mode="json"), sort_keys=True) for row in self.rows or ()]

    def stored(self, row_lines: list[str] | None = None) -> RunSpec:
        """The spec as a run's record keeps it (``row_lines``: ``row_lines()``, if made).
        A `captions` spec is stored once mapped to rows (``with_rows``)."""
        if self.captions is not None:
            raise ValueError("map the captions to rows (with_rows) before storing the spec")
        options = self.model_dump(exclude={"rows", "captions", "edits_per_caption"})
        if self.rows is None:
            return RunSpec(**options)
        lines = self.row_lines() if row_lines is None else row_lines
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        return RunSpec(**options, rows_count=len(lines), rows_sha256=digest)


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
    # The id of the API key that created the run; only that key sees it.
    # The API key id the run belongs to ("" in records from before keys: nobody's).
    owner: str = ""
    status: RunStatus = RunStatus.queued
    spec: RunSpec
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


class RunRowsMissing(LookupError):
    """A run's stored caption rows are gone (expired, or deleted)."""

    def __init__(self, run_id: str, index: int) -> None:
        super().__init__(f"dataset run {run_id}: caption row {index} is not stored")
        self.run_id = run_id
        self.index = index


class DatasetRunList(BaseModel):
    """A page of the caller's dataset runs, newest first."""

    data: list[DatasetRun]
    # Pass as `cursor` for the next page; null: this is the last page.
    next_cursor: str | None = None


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
    """Dataset runs in Redis: the record as JSON, the caption rows a spec gave as a list,
    rows done as a set with pair counts, the heartbeat as a timestamp, the export lease,
    how far the run's chunk tasks are enqueued, and each owner's runs as a sorted set
    (newest first listings)."""

    def __init__(self, client: redis.Redis, ttl_s: int, namespace: str = "instructedit") -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.namespace = namespace
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
        return self.get_many([run_id])[0]

    def get_many(self, run_ids: Iterable[str]) -> list[DatasetRun | None]:
        """The runs with progress, in the order of ``run_ids`` (None: no such run), read
        in one round trip."""
        run_ids = list(run_ids)
        with self.redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.get(self._key(run_id))
                pipe.get(self._key(run_id, "heartbeat"))
                pipe.hgetall(self._key(run_id, "counts"))
                pipe.scard(self._key(run_id, "rows"))
            replies = pipe.execute()
        runs: list[DatasetRun | None] = []
        for at in range(0, len(replies), 4):
            raw, heartbeat, counts, rows_done = replies[at : at + 4]
            if raw is None:
                runs.append(None)
                continue
            run = DatasetRun.model_validate_json(raw)
            run.heartbeat_at = self._heartbeat(heartbeat)
            run.progress.rows_done = rows_done
            run.progress.pairs_generated = int(counts.get(b"generated", 0))
            run.progress.pairs_kept = int(counts.get(b"kept", 0))
            runs.append(run)
        return runs

    def owner_index(self, owner: str) -> str:
        """The sorted set of ``owner``'s runs (score: creation time)."""
        return owner_index_key(self.namespace, "datasets", owner)

    def list_runs(
        self,
        owner: str,
        limit: int = 20,
        cursor: str | None = None,
        status: RunStatus | None = None,
    ) -> tuple[list[DatasetRun], str | None]:
        """A page of ``owner``'s runs, newest first, and the next page's cursor (raises
        ``listing.BadCursor``)."""

        def keep(run: DatasetRun) -> bool:
            return run.owner == owner and (status is None or run.status == status)

        return page(self.redis, self.owner_index(owner), self.get_many, limit, cursor, keep)

    def _write(self, pipe, run: DatasetRun) -> None:
        pipe.set(self._key(run.id), run.model_dump_json(exclude={"heartbeat_at"}), ex=self.ttl_s)
        # The given rows live as long as the record (EXPIRE of a missing key does nothing).
        pipe.expire(self._key(run.id, "input-rows"), self.ttl_s)

    def input_row(self, run_id: str, index: int) -> RowInput:
        """Caption row ``index`` of the rows a run's spec gave (raises RunRowsMissing)."""
        raw = self.redis.lindex(self._key(run_id, "input-rows"), index)
        if raw is None:
            raise RunRowsMissing(run_id, index)
        return RowInput.model_validate_json(raw)

    def beat(self, run_id: str, at: datetime | None = None) -> None:
        """Record a sign of life of the run's workers (``at``: now by default)."""
        when = (at or utcnow()).timestamp()
        self.redis.set(self._key(run_id, "heartbeat"), repr(when), ex=self.ttl_s)

    def _transact(
        self,
        run_id: str,
        change: Callable[[DatasetRun | None], DatasetRun | None],
        beat: bool = False,
        also: Callable[[Any, DatasetRun], None] | None = None,
    ) -> DatasetRun | None:
        """Read the record, let ``change`` decide the new one (None: write nothing), write
        it (and a heartbeat, with ``beat``; and what ``also(pipe, record)`` adds) if
        neither the record nor the heartbeat changed meanwhile; retry otherwise."""
        keys = (self._key(run_id), self._key(run_id, "heartbeat"))

        def write(pipe, updated: DatasetRun) -> None:
            self._write(pipe, updated)
            if beat:
                pipe.set(keys[1], repr(utcnow().timestamp()), ex=self.ttl_s)
            if also is not None:
                also(pipe, updated)

        return compare_and_set(
            self.redis, keys, lambda pipe: self._record(pipe, run_id), change, write
        )

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
        self, spec: DatasetSpec, owner: str, stale_after_s: float = STALE_RUN_AFTER_S
    ) -> tuple[DatasetRun, bool]:
        """``owner``'s run for ``spec``, and whether it must be (re)queued: it is new,
        failed, canceled, or stale. A requeued run starts a new generation; its given
        rows are (re)written with it, and it is (re)indexed under its owner."""
        run_id = spec.run_id(owner)
        row_lines = spec.row_lines()
        stored_spec = spec.stored(row_lines)
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
                owner=owner,
                spec=stored_spec,
                progress=RunProgress(rows_total=spec.total_rows),
                generation=existing.generation + 1 if existing else 0,
                created_at=existing.created_at if existing else utcnow(),
            )

        def store_rows_and_index(pipe, run: DatasetRun) -> None:
            if row_lines:
                rows = self._key(run_id, "input-rows")
                pipe.delete(rows)
                pipe.rpush(rows, *row_lines)
                pipe.expire(rows, self.ttl_s)
            index = self.owner_index(owner)
            pipe.zadd(index, {run_id: run.created_at.timestamp()})
            pipe.expire(index, self.ttl_s)

        # The heartbeat goes with the record: a concurrent post must not find the resumed
        # run still stale and requeue it once more.
        self._transact(run_id, change, beat=True, also=store_rows_and_index)
        run = self.get(run_id)
        if run is None:  # expired in between; a new record is one retry away
            return self.create_or_resume(spec, owner, stale_after_s)
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

    def chunks_to_enqueue(self, run: DatasetRun, start: int = 0) -> list[tuple[int, int]]:
        """The chunks of a (re)queued run from row ``start`` on that still have rows to
        make. When no chunk of the run has any, the last chunk alone: its task finds
        nothing to make and moves the run on to its export."""
        total = run.spec.total_rows
        chunks = chunk_ranges(total)
        missing = set(self.missing_rows(run.id, range(start, total)))
        pending = [c for c in chunks if c[0] >= start and any(i in missing for i in range(*c))]
        if pending or (start > 0 and self.missing_rows(run.id, range(start))):
            return pending
        return [c for c in chunks[-1:] if c[0] >= start]

    # How far a generation's chunk tasks are enqueued (the planning task records it as it
    # goes, so that a planning task run again goes on from there).
    def plan_position(self, run_id: str, generation: int) -> int:
        """The row before which chunk tasks of ``generation`` are enqueued (0: none)."""
        raw = self.redis.get(self._key(run_id, "planned"))
        if raw is None:
            return 0
        stored_generation, _, position = raw.decode().partition(":")
        return int(position) if int(stored_generation) == generation else 0

    def set_plan_position(self, run_id: str, generation: int, position: int) -> None:
        self.redis.set(self._key(run_id, "planned"), f"{generation}:{position}", ex=self.ttl_s)

    # The export lease: one export of a run at a time, even when the broker redelivers the
    # export task while the first delivery still runs (it outlasts the visibility timeout).
    def acquire_lease(self, run_id: str, name: str, token: str, ttl_s: int) -> bool:
        return bool(self.redis.set(self._key(run_id, f"lease:{name}"), token, nx=True, ex=ttl_s))

    def renew_lease(self, run_id: str, name: str, token: str, ttl_s: int) -> bool:
        key = self._key(run_id, f"lease:{name}")
        return bool(self._lease_renew(keys=[key], args=[token, ttl_s]))

    def release_lease(self, run_id: str, name: str, token: str) -> None:
        self._lease_release(keys=[self._key(run_id, f"lease:{name}")], args=[token])
