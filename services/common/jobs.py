"""The edit job contract: its schema, its storage keys and its record in Redis.

The API creates the record, the worker moves it through its states, and both read it.
State changes are compare-and-set so a cancel racing a worker start is never lost.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel, Field

SEED_MAX = 2**32 - 1


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


FINISHED = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})


class EditParams(BaseModel):
    prompt: str = Field(min_length=1, max_length=500)
    negative_prompt: str | None = Field(None, max_length=500)
    num_inference_steps: int = Field(20, ge=1, le=100)
    guidance_scale: float = Field(7.5, ge=0.0, le=30.0)
    image_guidance_scale: float = Field(1.5, ge=0.0, le=10.0)
    seed: int = Field(default_factory=lambda: secrets.randbelow(SEED_MAX + 1), ge=0, le=SEED_MAX)
    num_outputs: int = Field(1, ge=1, le=4)


def uses_guidance(params: EditParams) -> bool:
    """InstructPix2Pix runs its three guidance branches only above these scales (the
    pipeline's own rule); below, the text branch alone."""
    return params.guidance_scale > 1.0 and params.image_guidance_scale >= 1.0


def batch_key(size: tuple[int, int], params: EditParams) -> str:
    """Jobs with equal keys can share one UNet call per step: same latent shape, same
    timesteps, same branch layout. Prompts, seeds, scales and output counts may differ."""
    mode = "cfg" if uses_guidance(params) else "text"
    return f"{size[0]}x{size[1]}:{params.num_inference_steps}:{mode}"


class Progress(BaseModel):
    step: int = 0
    total: int


class JobError(BaseModel):
    code: str
    message: str


class EditJob(BaseModel):
    id: str
    status: JobStatus = JobStatus.queued
    params: EditParams
    progress: Progress
    input_key: str
    input_content_type: str
    # Model input size and steps decide which jobs a worker may batch with this one.
    batch_key: str = ""
    output_keys: list[str] = []
    error: JobError | None = None
    # Set while a worker holds the job, renewed by its heartbeat. A lapsed lease means the
    # worker died and another may take the job over. The owner token is new at every claim:
    # a worker that lost its claim can no longer move the job or publish outputs.
    lease_expires_at: datetime | None = None
    lease_owner: str | None = None
    request_id: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def new(
        cls,
        params: EditParams,
        input_content_type: str,
        request_id: str | None = None,
        input_size: tuple[int, int] | None = None,
    ) -> EditJob:
        job_id = new_job_id()
        return cls(
            id=job_id,
            params=params,
            batch_key=batch_key(input_size, params) if input_size else "",
            progress=Progress(step=0, total=params.num_inference_steps),
            input_key=input_key(job_id),
            input_content_type=input_content_type,
            request_id=request_id,
            created_at=utcnow(),
        )


def new_job_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


def input_key(job_id: str) -> str:
    return f"edits/{job_id}/input"


def output_key(job_id: str, index: int, attempt: str) -> str:
    # Per attempt: a worker that lost its claim never overwrites the outputs the job
    # finally points at, and can delete its own.
    return f"edits/{job_id}/{attempt}/output_{index}.png"


class JobNotFound(KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class TransitionRefused(Exception):
    """The job is not in a state that allows the change (e.g. canceling a finished job)."""

    def __init__(self, job: EditJob) -> None:
        super().__init__(f"job {job.id} is {job.status}")
        self.job = job


class JobStore:
    """Edit job records as JSON strings in Redis, one key per job, expiring after a TTL.

    Beside the records, an index of every unfinished job scored by the time it must have
    moved on by: a queued job by `redeliver_after_s` after it was queued (else its queue
    message is presumed lost), a running job by its lease (else its worker died). The
    reaper (services/gpu_worker/reaper.py) sends overdue jobs to the queue again, so an
    accepted job is never lost with a message.
    """

    def __init__(
        self,
        client: redis.Redis,
        ttl_s: int,
        namespace: str = "instructedit",
        redeliver_after_s: float = 600.0,
    ) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.namespace = namespace
        self.redeliver_after_s = redeliver_after_s
        self._active = f"{namespace}:active"

    def _key(self, job_id: str) -> str:
        return f"{self.namespace}:job:{job_id}"

    def create(self, job: EditJob) -> None:
        deadline = job.created_at.timestamp() + self.redeliver_after_s
        with self.redis.pipeline() as pipe:  # MULTI: the record never exists unindexed
            pipe.set(self._key(job.id), job.model_dump_json(), ex=self.ttl_s, nx=True)
            pipe.zadd(self._active, {job.id: deadline}, nx=True)
            created, _ = pipe.execute()
        if not created:
            raise RuntimeError(f"job id collision: {job.id}")

    def get(self, job_id: str) -> EditJob:
        raw = self.redis.get(self._key(job_id))
        if raw is None:
            raise JobNotFound(job_id)
        return EditJob.model_validate_json(raw)

    def transition(
        self,
        job_id: str,
        allowed_from: frozenset[JobStatus] | set[JobStatus],
        when: Callable[[EditJob], bool] | None = None,
        **changes: Any,
    ) -> EditJob:
        """Apply `changes` only if the job's status is in `allowed_from` (and `when(job)`
        holds, if given), atomically.

        Raises TransitionRefused with the current record otherwise.
        """
        key = self._key(job_id)
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFound(job_id)
                    job = EditJob.model_validate_json(raw)
                    if job.status not in allowed_from or (when and not when(job)):
                        raise TransitionRefused(job)
                    updated = job.model_copy(update=changes)
                    pipe.multi()
                    pipe.set(key, updated.model_dump_json(), ex=self.ttl_s)
                    if updated.status in FINISHED:
                        pipe.zrem(self._active, job_id)
                    elif updated.lease_expires_at is not None:
                        pipe.zadd(self._active, {job_id: updated.lease_expires_at.timestamp()})
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    time.sleep(0.001)
                    continue

    def delete(self, job_id: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.delete(self._key(job_id))
            pipe.zrem(self._active, job_id)
            pipe.execute()

    def overdue(self, now: datetime, limit: int = 100) -> list[str]:
        """Unfinished jobs past their deadline, most overdue first."""
        ids = self.redis.zrangebyscore(self._active, "-inf", now.timestamp(), 0, limit)
        return [i.decode() for i in ids]

    def postpone(self, job_id: str, until: datetime) -> None:
        """Move an overdue job's deadline (it was just sent again); XX: never re-adds a job
        that finished meanwhile."""
        self.redis.zadd(self._active, {job_id: until.timestamp()}, xx=True)

    def forget(self, job_id: str) -> None:
        """Drop a job from the index (its record expired)."""
        self.redis.zrem(self._active, job_id)

    # Jobs waiting for a worker, per batch key, oldest first: where a worker looks for
    # jobs to run together with the one its queue message named.
    def _pending_key(self, key: str) -> str:
        return f"{self.namespace}:pending:{key}"

    def add_pending(self, job: EditJob) -> None:
        self.redis.zadd(self._pending_key(job.batch_key), {job.id: job.created_at.timestamp()})

    def pending(self, key: str, limit: int) -> list[str]:
        return [i.decode() for i in self.redis.zrange(self._pending_key(key), 0, limit - 1)]

    def remove_pending(self, key: str, *job_ids: str) -> None:
        if job_ids:
            self.redis.zrem(self._pending_key(key), *job_ids)
