"""The fine-tune contract: what a client asks for, the run's record, and its storage keys.

A fine-tune belongs to the API key that created it and is identified by a hash of that
key's id and the request, so the same key posting the same request again gets the same
fine-tune: a failed, canceled or stale one (running, but its worker has not reported for
STALE_FINETUNE_AFTER_S) is requeued as a new *generation*, and its worker resumes from the
latest checkpoint in storage (``finetunes/<id>/checkpoints/step-N/``).

Status changes are compare-and-set (as RunStore's are): a cancel racing the worker is never
overwritten, and a task of an older generation finds its generation gone and stops.

This module imports neither torch nor the trainer: the API validates requests with it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel, Field, field_validator

from services.common.jobs import utcnow
from services.common.listing import owner_index_key, page
from services.common.redis_cas import compare_and_set
from services.gpu_worker.finetune.config import FinetuneConfig

DATASET_ID_PATTERN = r"^[0-9a-f]{20}$"
# A running fine-tune whose worker has not reported (a step, a checkpoint upload) for this
# long is stale: posting its request again requeues it. Above the time a checkpoint upload,
# a validation render or the model's load takes.
STALE_FINETUNE_AFTER_S = 15 * 60


class FinetuneStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


FINETUNE_FINISHED = frozenset(
    {FinetuneStatus.succeeded, FinetuneStatus.failed, FinetuneStatus.canceled}
)
FINETUNE_ACTIVE = frozenset({FinetuneStatus.queued, FinetuneStatus.running})


class FinetuneRequest(BaseModel):
    """What to fine-tune: a dataset (one of your succeeded dataset runs), the base model and
    the hyper-parameters."""

    dataset: str = Field(
        pattern=DATASET_ID_PATTERN,
        description="The id of one of your dataset runs (POST /v1/datasets) that succeeded",
    )
    base_model: str | None = Field(
        None,
        max_length=300,
        description="The InstructPix2Pix model to fine-tune: one of the ids the server allows "
        "(its `finetune_base_models` setting); null: the server's edit model",
    )
    config: FinetuneConfig = Field(default_factory=FinetuneConfig)

    @field_validator("config")
    @classmethod
    def _lora_only(cls, config: FinetuneConfig) -> FinetuneConfig:
        # The service serves what a fine-tune makes as an edit's `adapter`: LoRA only.
        if config.mode != "lora":
            raise ValueError("the service trains LoRA adapters only (mode 'lora')")
        return config

    def finetune_id(self, owner: str) -> str:
        content = {"owner": owner, "request": self.model_dump(mode="json")}
        canonical = json.dumps(content, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]


class FinetuneProgress(BaseModel):
    step: int = 0
    total: int
    # The loss of the latest step (null before the first).
    loss: float | None = None
    eta_s: float | None = None
    images_per_s: float | None = None


class FinetuneError(BaseModel):
    code: str
    message: str


class Finetune(BaseModel):
    id: str
    # The API key id the fine-tune belongs to; only that key sees it.
    owner: str = ""
    status: FinetuneStatus = FinetuneStatus.queued
    request: FinetuneRequest
    progress: FinetuneProgress
    # Storage keys of the latest validation renders (the API serves them as URLs).
    validation_keys: list[str] = []
    validation_step: int | None = None
    adapter: str | None = Field(
        None,
        description="The LoRA adapter id the fine-tune made, to give as `adapter` of "
        "POST /v1/edits; null until it succeeded",
    )
    error: FinetuneError | None = None
    # Bumped each time the fine-tune is (re)queued; tasks of another generation stop.
    generation: int = 0
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # The last sign of life: (re)queued, started, a step reported.
    heartbeat_at: datetime | None = None

    def last_seen(self) -> datetime:
        return self.heartbeat_at or self.started_at or self.created_at


class FinetuneList(BaseModel):
    """A page of the caller's fine-tunes, newest first."""

    data: list[Finetune]
    next_cursor: str | None = None


def finetune_prefix(finetune_id: str) -> str:
    return f"finetunes/{finetune_id}"


def checkpoints_prefix(finetune_id: str) -> str:
    return f"{finetune_prefix(finetune_id)}/checkpoints"


def adapter_prefix(finetune_id: str) -> str:
    return f"{finetune_prefix(finetune_id)}/adapter"


def validation_prefix(finetune_id: str) -> str:
    return f"{finetune_prefix(finetune_id)}/validation"


def adapter_id_for(finetune_id: str) -> str:
    return f"ft-{finetune_id[:12]}"


class FinetuneNotFound(KeyError):
    def __init__(self, finetune_id: str) -> None:
        super().__init__(finetune_id)
        self.finetune_id = finetune_id


class FinetuneTransitionRefused(Exception):
    """The fine-tune is not in a state that allows the change."""

    def __init__(self, finetune: Finetune) -> None:
        super().__init__(
            f"fine-tune {finetune.id} is {finetune.status} (generation {finetune.generation})"
        )
        self.finetune = finetune


class FinetuneStore:
    """Fine-tunes in Redis: the record as JSON (heartbeat included) and each owner's
    fine-tunes as a sorted set (newest-first listings)."""

    def __init__(self, client: redis.Redis, ttl_s: int, namespace: str = "instructedit") -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.namespace = namespace
        self.ns = f"{namespace}:finetune"

    def _key(self, finetune_id: str) -> str:
        return f"{self.ns}:{finetune_id}:record"

    def owner_index(self, owner: str) -> str:
        return owner_index_key(self.namespace, "finetunes", owner)

    def get(self, finetune_id: str) -> Finetune | None:
        return self.get_many([finetune_id])[0]

    def get_many(self, finetune_ids: Iterable[str]) -> list[Finetune | None]:
        ids = list(finetune_ids)
        if not ids:
            return []
        raws = self.redis.mget([self._key(i) for i in ids])
        return [Finetune.model_validate_json(raw) if raw is not None else None for raw in raws]

    def list_finetunes(
        self,
        owner: str,
        limit: int = 20,
        cursor: str | None = None,
        status: FinetuneStatus | None = None,
    ) -> tuple[list[Finetune], str | None]:
        """A page of ``owner``'s fine-tunes, newest first (raises ``listing.BadCursor``)."""

        def keep(finetune: Finetune) -> bool:
            return finetune.owner == owner and (status is None or finetune.status == status)

        return page(self.redis, self.owner_index(owner), self.get_many, limit, cursor, keep)

    def _transact(
        self,
        finetune_id: str,
        change: Callable[[Finetune | None], Finetune | None],
        also: Callable[[Any, Finetune], None] | None = None,
    ) -> Finetune | None:
        """Read the record, let ``change`` decide the new one (None: write nothing), and
        write it if the record did not change meanwhile; retry otherwise."""
        key = self._key(finetune_id)

        def read(pipe) -> Finetune | None:
            raw = pipe.get(key)
            return Finetune.model_validate_json(raw) if raw is not None else None

        def write(pipe, updated: Finetune) -> None:
            pipe.set(key, updated.model_dump_json(), ex=self.ttl_s)
            if also is not None:
                also(pipe, updated)

        return compare_and_set(self.redis, [key], read, change, write)

    def transition(
        self,
        finetune_id: str,
        allowed_from: Iterable[FinetuneStatus],
        when: Callable[[Finetune], bool] | None = None,
        **changes: Any,
    ) -> Finetune:
        """Apply ``changes`` only if the status is in ``allowed_from`` (and ``when`` holds),
        atomically. Raises FinetuneNotFound or FinetuneTransitionRefused."""
        allowed = frozenset(allowed_from)

        def change(current: Finetune | None) -> Finetune:
            if current is None:
                raise FinetuneNotFound(finetune_id)
            if current.status not in allowed or (when is not None and not when(current)):
                raise FinetuneTransitionRefused(current)
            return current.model_copy(update=changes)

        return self._transact(finetune_id, change)

    def report_progress(
        self,
        finetune_id: str,
        generation: int,
        progress: FinetuneProgress | None = None,
        **changes: Any,
    ) -> Finetune | None:
        """Record progress (and other ``changes``, e.g. validation keys) with a heartbeat,
        only while the fine-tune runs as ``generation``. None: it does not (canceled,
        requeued, gone): the worker should stop."""

        def change(current: Finetune | None) -> Finetune | None:
            if (
                current is None
                or current.status != FinetuneStatus.running
                or current.generation != generation
            ):
                return None
            update = {"heartbeat_at": utcnow(), **changes}
            if progress is not None:
                update["progress"] = progress
            return current.model_copy(update=update)

        return self._transact(finetune_id, change)

    def is_stale(self, finetune: Finetune, stale_after_s: float = STALE_FINETUNE_AFTER_S) -> bool:
        if finetune.status != FinetuneStatus.running:
            return False
        return utcnow() - finetune.last_seen() > timedelta(seconds=stale_after_s)

    def create_or_resume(
        self,
        request: FinetuneRequest,
        owner: str,
        stale_after_s: float = STALE_FINETUNE_AFTER_S,
    ) -> tuple[Finetune, bool]:
        """``owner``'s fine-tune for ``request``, and whether it must be (re)queued: it is
        new, failed, canceled or stale. A requeued one starts a new generation (its
        progress so far is kept: the worker resumes from the stored checkpoint)."""
        finetune_id = request.finetune_id(owner)
        requeued = False

        def change(existing: Finetune | None) -> Finetune | None:
            nonlocal requeued
            requeued = False
            resumable = existing is None or existing.status in (
                FinetuneStatus.failed,
                FinetuneStatus.canceled,
            )
            if not resumable and not self.is_stale(existing, stale_after_s):
                return None
            requeued = True
            now = utcnow()
            if existing is None:
                return Finetune(
                    id=finetune_id,
                    owner=owner,
                    request=request,
                    progress=FinetuneProgress(total=request.config.max_steps),
                    created_at=now,
                    heartbeat_at=now,
                )
            return existing.model_copy(
                update={
                    "status": FinetuneStatus.queued,
                    "generation": existing.generation + 1,
                    "error": None,
                    "finished_at": None,
                    "heartbeat_at": now,
                }
            )

        def index(pipe, finetune: Finetune) -> None:
            key = self.owner_index(owner)
            pipe.zadd(key, {finetune_id: finetune.created_at.timestamp()})
            pipe.expire(key, self.ttl_s)

        self._transact(finetune_id, change, also=index)
        finetune = self.get(finetune_id)
        if finetune is None:  # expired in between
            return self.create_or_resume(request, owner, stale_after_s)
        return finetune, requeued
