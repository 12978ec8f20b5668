"""The edit job contract: its schema, its storage keys and its record in Redis.

The API creates the record, the worker moves it through its states, and both read it.
Every change is one named JobStore operation, allowed by the lifecycle table
(job_lifecycle.py) and applied compare-and-set, so a cancel racing a worker start is
never lost.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

import redis
from pydantic import BaseModel

# JobStatus and FINISHED belong to the lifecycle; most code imports them from here.
from services.common.edit_params import EditParams, batch_key
from services.common.job_events import (
    JOB_EVENTS_MAXLEN,
    QUEUE_EVENTS_MAXLEN,
    RECENT_FINISHES,
    estimated_wait_s,
    event_fields,
    finish_entry,
    job_events_key,
    queue_events_key,
    recent_finishes_key,
)
from services.common.job_lifecycle import FINISHED, LIFECYCLE, JobOperation, JobStatus
from services.common.listing import owner_index_key, page
from services.common.webhooks import WebhookSpec

# A record outlives its retention time by this much in Redis, so that the reaper, which
# deletes the record together with its stored images at the retention time, still finds
# whose it was; past it, Redis drops a record the reaper never got to.
RECORD_GRACE_S = 3600


class Progress(BaseModel):
    step: int = 0
    total: int


class JobErrorCode(StrEnum):
    """Why a job ended `failed`: its `error.code` in the API."""

    input_missing = "input_missing"
    input_invalid = "input_invalid"
    storage_error = "storage_error"
    model_unavailable = "model_unavailable"
    out_of_memory = "out_of_memory"
    timeout = "timeout"
    internal_error = "internal_error"
    enqueue_failed = "enqueue_failed"


JOB_ERROR_MESSAGES: dict[JobErrorCode, str] = {
    JobErrorCode.input_missing: "the input image is not in storage",
    JobErrorCode.input_invalid: "the stored input image is unusable",
    JobErrorCode.storage_error: "image storage failed",
    JobErrorCode.model_unavailable: "the model is unavailable",
    JobErrorCode.out_of_memory: "the GPU ran out of memory; try a smaller image or fewer outputs",
    JobErrorCode.timeout: "the edit took longer than the time limit",
    JobErrorCode.internal_error: "the edit failed unexpectedly",
    JobErrorCode.enqueue_failed: "the job could not be queued",
}


class JobError(BaseModel):
    code: JobErrorCode
    message: str

    @classmethod
    def of(cls, code: JobErrorCode, detail: str | None = None) -> JobError:
        """The code's message, followed by what went wrong this time."""
        message = JOB_ERROR_MESSAGES[code]
        return cls(code=code, message=f"{message}: {detail}" if detail else message)


class EditJob(BaseModel):
    id: str
    status: JobStatus = JobStatus.queued
    # The API key id the job belongs to: nobody else sees it.
    owner: str = ""
    params: EditParams
    # Where the job's events are delivered, if anywhere (services/common/webhooks.py).
    webhook: WebhookSpec | None = None
    progress: Progress
    input_key: str
    input_content_type: str
    # Where the edit may change the image (white) as uploaded, when the client sent one.
    mask_key: str | None = None
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
        model_size: tuple[int, int] | None = None,
        with_mask: bool = False,
        owner: str = "",
        webhook: WebhookSpec | None = None,
        job_id: str | None = None,
    ) -> EditJob:
        job_id = job_id or new_job_id()
        return cls(
            id=job_id,
            owner=owner,
            webhook=webhook,
            params=params,
            batch_key=batch_key(model_size, params) if model_size else "",
            progress=Progress(step=0, total=params.num_inference_steps),
            input_key=input_key(job_id),
            input_content_type=input_content_type,
            mask_key=mask_key(job_id) if with_mask else None,
            request_id=request_id,
            created_at=utcnow(),
        )


def new_job_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


def job_prefix(job_id: str) -> str:
    """Where everything the job stores lives: input, mask, every attempt's outputs. The id
    is 122 random bits, so no key can be guessed."""
    return f"edits/{job_id}/"


def input_key(job_id: str) -> str:
    return f"edits/{job_id}/input"


def mask_key(job_id: str) -> str:
    return f"edits/{job_id}/mask"


def output_key(job_id: str, index: int, attempt: str, extension: str = "png") -> str:
    # Per attempt: a worker that lost its claim never overwrites the outputs the job
    # finally points at, and can delete its own.
    return f"edits/{job_id}/{attempt}/output_{index}.{extension}"


class JobNotFound(KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class TransitionRefused(Exception):
    """The job is not in a state that allows the operation (e.g. canceling a finished job)."""

    def __init__(self, job: EditJob) -> None:
        super().__init__(f"job {job.id} is {job.status}")
        self.job = job


class SubmissionRefused(Exception):
    """`create` refused a new job to keep a limit: `reason` is "queue_full" (the unfinished
    jobs of all keys) or "too_many_unfinished" (those of the job's owner)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Claim(NamedTuple):
    job: EditJob
    # The job was running under a lapsed lease: its first worker died. Its start stays
    # the first one, so the job's queue wait and duration are the user's.
    took_over: bool


class ProgressReport(NamedTuple):
    """One job's share of JobStore.report_progress_many."""

    # The record exactly as this claim last wrote it: the claim itself, or what
    # report_progress_many returned for it last time.
    job: EditJob
    # The new progress; None: unchanged.
    progress: Progress | None = None
    # Extend the lease to `lease` from now.
    renew: bool = False


# Compare-and-set of several records in one round trip (and as few commands as can be: one
# per job, and one more where its progress moved). Per job: if its record is still byte for
# byte what the worker last wrote (so the lifecycle allowed that worker's operations on it
# then, and nobody changed it since), the new record replaces it, when the lease was renewed
# the index of unfinished jobs gets its new deadline, and when the progress moved the job's
# event stream gets the new step (job_events.py). The write reads the old record in the same
# command (SET ... GET); if that was not the expected one, it is put back at once, and
# returned for the caller to judge against the lifecycle. Atomic: nobody ever sees the
# record in between.
#   KEYS[1]: the index of unfinished jobs; KEYS[2i], KEYS[2i + 1]: job i's record and
#   event stream
#   ARGV[1]: the event streams' length; per job: its id, the record as last written, the
#   new record ('' to only look), the lease's new deadline ('' when not renewed), and the
#   new step and total ('' when the progress did not move)
# Returns per job: 1 (as expected: written if asked), its current record, or 0 (none).
_PROGRESS_SCRIPT = """
local out = {}
for i = 2, #KEYS, 2 do
  local a = (i - 2) / 2 * 6 + 2
  local new = ARGV[a + 2]
  local raw
  if new ~= '' then
    raw = redis.call('SET', KEYS[i], new, 'KEEPTTL', 'GET')
  else
    raw = redis.call('GET', KEYS[i])
  end
  if raw == ARGV[a + 1] then
    if ARGV[a + 3] ~= '' then
      redis.call('ZADD', KEYS[1], ARGV[a + 3], ARGV[a])
    end
    if new ~= '' and ARGV[a + 4] ~= '' then
      redis.call('XADD', KEYS[i + 1], 'MAXLEN', '~', ARGV[1], '*',
                 's', 'running', 'p', ARGV[a + 4], 't', ARGV[a + 5])
    end
    out[#out + 1] = 1
  else
    if new ~= '' then
      if raw then
        redis.call('SET', KEYS[i], raw, 'KEEPTTL')
      else
        redis.call('DEL', KEYS[i])
      end
    end
    out[#out + 1] = raw or 0
  end
end
return out
"""


def _report_operation(report: ProgressReport) -> JobOperation:
    """The lifecycle operation a report amounts to (a mere look is judged as a renewal:
    whether the claim still holds)."""
    return JobOperation.report_progress if report.progress is not None else JobOperation.renew_lease


# `create` without reading first: the limits are checked and the record is written only
# where there is none (SET NX, which also returns the record that stands in the way), and
# indexed only then, all atomically, so that concurrent submissions cannot overshoot a
# limit. (Its event stream starts with the job's first change: until then the record is
# the whole story.)
#   KEYS: the record, the index of unfinished jobs, the owner's jobs, the owner's
#   unfinished jobs, the retention index, every job's owner
#   ARGV: the record, its TTL, its deadline in the index, the job's id, its creation
#   time, its retention time, the most unfinished jobs in all, and of the owner, and the
#   creation time before which the owner's unfinished jobs are stale, the owner
# Returns {1} (created), {0, the record that was there} or {2, the limit it would break}.
_CREATE_SCRIPT = """
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[7]) then
  return {2, 'queue_full'}
end
-- An unfinished job older than retention has lost its record: it no longer counts.
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[9])
if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[8]) then
  return {2, 'too_many_unfinished'}
end
local old = redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'NX', 'GET')
if old then
  return {0, old}
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[4])
redis.call('HSET', KEYS[6], ARGV[4], ARGV[10])
return {1}
"""


# What an operation queues into the MULTI once the lifecycle allowed it: given the current
# record (None only where the rule allows no record) and the time, returns the result.
Write = Callable[[redis.client.Pipeline, "EditJob | None", datetime], Any]


class JobStore:
    """Edit job records as JSON strings in Redis, one key per job, expiring after a TTL.

    Beside the records, an index of every unfinished job scored by the time it must have
    moved on by: a queued job by `redeliver_after_s` after it was queued (else its queue
    message is presumed lost), a running job by its lease (else its worker died). The
    reaper (services/gpu_worker/reaper.py) sends overdue jobs to the queue again, so an
    accepted job is never lost with a message.

    Every change of a record is one of the named operations below, each checked against
    the lifecycle table and applied compare-and-set; only this class writes the fields.
    """

    def __init__(
        self,
        client: redis.Redis,
        ttl_s: int,
        namespace: str = "instructedit",
        redeliver_after_s: float = 600.0,
        max_unfinished: int = 10_000,
        max_unfinished_per_owner: int = 10_000,
    ) -> None:
        self.redis = client
        # Retention: a record and its stored images go this long after the job's last
        # change (the reaper deletes both; Redis keeps the record RECORD_GRACE_S longer).
        self.ttl_s = ttl_s
        self._record_ttl_s = ttl_s + RECORD_GRACE_S
        self.max_unfinished = max_unfinished
        self.max_unfinished_per_owner = max_unfinished_per_owner
        self.namespace = namespace
        self.redeliver_after_s = redeliver_after_s
        self._active = f"{namespace}:active"
        # Every batch key with (possibly) pending jobs: where a worker looks for its next
        # batch. A key may stay listed a while after its last job left.
        self._pending_keys = f"{namespace}:pending-keys"
        self._shas: dict[str, str] = {}  # Lua scripts' SHA1s, once loaded
        # What watchers follow (job_events.py): jobs leaving the queue, recent successes.
        self._queue_events = queue_events_key(namespace)
        self._recent_finishes = recent_finishes_key(namespace)
        # Every job by the time its record and images are to be deleted.
        self._retention = f"{namespace}:retention"
        # Whose each job is, beside its record: retention and deletion find the owner's
        # indexes even when Redis already dropped the record.
        self._owners = f"{namespace}:job-owners"

    def _key(self, job_id: str) -> str:
        return f"{self.namespace}:job:{job_id}"

    def owner_index(self, owner: str) -> str:
        """The owner's jobs by creation time (services/common/listing.py)."""
        return owner_index_key(self.namespace, "edits", owner)

    def _owner_unfinished(self, owner: str) -> str:
        return owner_index_key(self.namespace, "edits-unfinished", owner)

    def deliveries_key(self, job_id: str) -> str:
        """The job's webhook delivery attempts (services/common/webhook_delivery.py)."""
        return f"{self.namespace}:job:{job_id}:webhook-deliveries"

    def events_key(self, job_id: str) -> str:
        """The job's event stream (job_events.py)."""
        return job_events_key(self.namespace, job_id)

    @property
    def queue_events_key(self) -> str:
        return self._queue_events

    def get(self, job_id: str) -> EditJob:
        raw = self.redis.get(self._key(job_id))
        if raw is None:
            raise JobNotFound(job_id)
        return EditJob.model_validate_json(raw)

    # -- the lifecycle's operations ----------------------------------------------------

    def create(self, job: EditJob) -> EditJob:
        """Record a new job, queued, and index it as unfinished: one round trip, refused
        (TransitionRefused) where the id already has a record: the lifecycle allows
        `create` from no status at all (job_lifecycle.py), which SET NX enforces."""
        created = job.model_copy(update={"status": JobStatus.queued})
        at = job.created_at.timestamp()
        keys = [
            self._key(job.id),
            self._active,
            self.owner_index(job.owner),
            self._owner_unfinished(job.owner),
            self._retention,
            self._owners,
        ]
        args = [
            created.model_dump_json(),
            self._record_ttl_s,
            repr(at + self.redeliver_after_s),
            job.id,
            repr(at),
            repr(at + self.ttl_s),
            self.max_unfinished,
            self.max_unfinished_per_owner,
            repr(at - self._record_ttl_s),
            job.owner,
        ]
        reply = self._script(_CREATE_SCRIPT, keys, args)
        if reply[0] == 0:
            raise TransitionRefused(EditJob.model_validate_json(reply[1]))
        if reply[0] == 2:
            raise SubmissionRefused(reply[1].decode())
        return created

    def claim(self, job_id: str, lease: timedelta, queued_only: bool = False) -> Claim:
        """Take the job for a worker, under a new owner token and a lease of `lease`.

        Queued, or (unless `queued_only`, as when gathering a batch) running under a
        lapsed lease. Raises TransitionRefused with the record otherwise.
        """
        took_over = False  # as seen by the attempt that applies (WATCH may retry)

        def changes(job: EditJob, now: datetime) -> dict[str, Any]:
            nonlocal took_over
            took_over = job.status == JobStatus.running
            return {
                "started_at": job.started_at or now,
                "lease_expires_at": now + lease,
                "lease_owner": secrets.token_hex(8),
                "progress": Progress(step=0, total=job.params.num_inference_steps),
                "output_keys": [],
                "error": None,
            }

        operation = JobOperation.claim_queued if queued_only else JobOperation.claim
        job = self._transition(operation, job_id, changes)
        return Claim(job, took_over)

    def renew_lease(self, job: EditJob, lease: timedelta) -> EditJob:
        """Extend the lease of `job`'s claim (which must still hold) to `lease` from now."""
        return self._transition(
            JobOperation.renew_lease,
            job.id,
            lambda _, now: {"lease_expires_at": now + lease},
            owner=job.lease_owner,
        )

    def report_progress(self, job: EditJob, step: int, total: int, lease: timedelta) -> EditJob:
        return self._transition(
            JobOperation.report_progress,
            job.id,
            lambda _, now: {
                "progress": Progress(step=step, total=total),
                "lease_expires_at": now + lease,
            },
            owner=job.lease_owner,
        )

    def report_progress_many(
        self, reports: Sequence[ProgressReport], lease: timedelta
    ) -> list[EditJob | TransitionRefused | JobNotFound]:
        """Progress and lease renewals of a worker's jobs, in one round trip to Redis.

        Per job: `report_progress` when its progress is given, else `renew_lease` when
        `renew`, else only a look at whether the claim still holds. Returns per job the
        record as it now stands when the claim holds (the `job` of its next report), or
        TransitionRefused (canceled, finished, taken over) or JobNotFound, not raised.

        Compare-and-set on the whole record: a record that is still what this claim last
        wrote is rewritten in the same round trip; one that changed otherwise is judged
        by the lifecycle table like every other operation (and, if the claim still
        holds, updated through it).
        """
        if not reports:
            return []
        now = utcnow()
        keys: list[str] = [self._active]
        args: list[Any] = [JOB_EVENTS_MAXLEN]
        updated: list[EditJob | None] = []
        for report in reports:
            changes: dict[str, Any] = {}
            if report.progress is not None:
                changes["progress"] = report.progress
            if report.renew:
                changes["lease_expires_at"] = now + lease
            # The same record byte for byte means the same verdict (the rule's guard,
            # holds_claim, does not depend on the time): a copy the lifecycle refuses
            # is only compared, never written.
            allowed = LIFECYCLE[_report_operation(report)].allows(
                report.job, report.job.lease_owner, now
            )
            new = report.job.model_copy(update=changes) if allowed else None
            updated.append(new)
            keys += [self._key(report.job.id), self.events_key(report.job.id)]
            moved = new is not None and report.progress is not None
            moved = moved and report.progress != report.job.progress
            args += [
                report.job.id,
                report.job.model_dump_json(),
                new.model_dump_json() if new is not None and changes else "",
                repr(new.lease_expires_at.timestamp()) if new is not None and report.renew else "",
                report.progress.step if moved else "",
                report.progress.total if moved else "",
            ]
        replies = self._script(_PROGRESS_SCRIPT, keys, args)
        results: list[EditJob | TransitionRefused | JobNotFound] = []
        for report, new, reply in zip(reports, updated, replies, strict=True):
            if reply == 1:
                results.append(new if new is not None else TransitionRefused(report.job))
            elif reply == 0:
                results.append(JobNotFound(report.job.id))
            else:
                current = EditJob.model_validate_json(reply)
                results.append(self._judge_report(report, current, lease))
        return results

    def _script(self, source: str, keys: list[str], args: list) -> Any:
        """Run a Lua script by its SHA, loading it first where Redis does not know it."""
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = self.redis.script_load(source)
        try:
            return self.redis.evalsha(sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:  # Redis restarted or its scripts flushed
            self._shas[source] = self.redis.script_load(source)
            return self.redis.evalsha(self._shas[source], len(keys), *keys, *args)

    def _judge_report(
        self, report: ProgressReport, current: EditJob, lease: timedelta
    ) -> EditJob | TransitionRefused | JobNotFound:
        """A report whose record changed since the claim last wrote it."""
        operation = _report_operation(report)
        if not LIFECYCLE[operation].allows(current, report.job.lease_owner, utcnow()):
            return TransitionRefused(current)
        try:
            if report.progress is not None:
                step, total = report.progress.step, report.progress.total
                return self.report_progress(current, step, total, lease)
            if report.renew:
                return self.renew_lease(current, lease)
        except (TransitionRefused, JobNotFound) as refused:
            return refused
        return current

    def succeed(self, job: EditJob, output_keys: list[str]) -> EditJob:
        return self._finish(JobOperation.succeed, job.id, job.lease_owner, output_keys=output_keys)

    def fail(self, job: EditJob, error: JobError) -> EditJob:
        """End a job the worker holding it could not run."""
        return self._finish(JobOperation.fail, job.id, job.lease_owner, error=error)

    def fail_unqueued(self, job_id: str) -> EditJob:
        """End a job whose queueing failed; refused if a worker took it meanwhile."""
        error = JobError.of(JobErrorCode.enqueue_failed)
        return self._finish(JobOperation.fail_unqueued, job_id, error=error)

    def cancel(self, job_id: str) -> EditJob:
        return self._finish(JobOperation.cancel, job_id)

    def requeue(self, job_id: str, retry_at: datetime, now: datetime | None = None) -> EditJob:
        """The job was sent to the queue again: look at it next at `retry_at`, giving a
        worker time to pick the message up. The record itself does not change."""

        def write(pipe, job, _):
            pipe.zadd(self._active, {job_id: retry_at.timestamp()})
            return job

        return self._apply(JobOperation.requeue, job_id, write, now=now)

    def expire(self, job_id: str) -> None:
        """Drop a job whose record expired (or that finished) from the index of unfinished
        jobs."""

        owner = self.owner_of(job_id)  # read first: the record may be gone

        def write(pipe, job, _):
            pipe.zrem(self._active, job_id)
            who = job.owner if job is not None else owner
            if who is not None:
                pipe.zrem(self._owner_unfinished(who), job_id)

        self._apply(JobOperation.expire, job_id, write)

    # -- applying an operation ---------------------------------------------------------

    def _finish(
        self, operation: JobOperation, job_id: str, owner: str | None = None, **fields: Any
    ) -> EditJob:
        # A finished job holds no lease: nothing renews it, and the reaper ignores it.
        return self._transition(
            operation,
            job_id,
            lambda _, now: {**fields, "finished_at": now, "lease_expires_at": None},
            owner=owner,
        )

    def _transition(
        self,
        operation: JobOperation,
        job_id: str,
        changes: Callable[[EditJob, datetime], dict[str, Any]],
        owner: str | None = None,
    ) -> EditJob:
        """Rewrite the record with `changes(job, now)` and the operation's target status,
        keeping both indexes in step."""
        target = LIFECYCLE[operation].target

        def write(pipe, job, now):
            status = target or job.status
            updated = job.model_copy(update={**changes(job, now), "status": status})
            pipe.set(self._key(job_id), updated.model_dump_json(), ex=self._record_ttl_s)
            if updated.status in FINISHED:
                # Retention counts from the end (an unfinished job keeps the time its
                # creation set, and its record the TTL its last write set).
                pipe.zadd(self._retention, {job_id: now.timestamp() + self.ttl_s})
                pipe.zrem(self._active, job_id)
                pipe.zrem(self._owner_unfinished(job.owner), job_id)
            elif updated.lease_expires_at is not None:
                pipe.zadd(self._active, {job_id: updated.lease_expires_at.timestamp()})
            if job.status == JobStatus.queued:
                # Taken or ended: no worker gathering a batch may pick it up any more.
                pipe.zrem(self._pending_key(job.batch_key), job_id)
            self._announce(pipe, job, updated)
            return updated

        return self._apply(operation, job_id, write, owner=owner)

    def _announce(self, pipe: redis.client.Pipeline, before: EditJob, after: EditJob) -> None:
        """Tell watchers (job_events.py) what changed, in the same MULTI: a new status or
        step goes to the job's event stream (a mere lease renewal goes nowhere), a job
        leaving the queue to the queue's stream, a success to the recent successes."""
        events = self.events_key(after.id)
        if (before.status, before.progress) != (after.status, after.progress):
            fields = event_fields(after.status, after.progress.step, after.progress.total)
            pipe.xadd(events, fields, maxlen=JOB_EVENTS_MAXLEN, approximate=True)
        if before.status == JobStatus.queued and after.status != JobStatus.queued:
            # The job's first change starts its event stream: it expires with the record.
            pipe.expire(events, self._record_ttl_s)
            created = {"c": repr(after.created_at.timestamp())}
            pipe.xadd(self._queue_events, created, maxlen=QUEUE_EVENTS_MAXLEN, approximate=True)
        if after.status == JobStatus.succeeded and after.started_at and after.finished_at:
            duration = (after.finished_at - after.started_at).total_seconds()
            pipe.lpush(self._recent_finishes, finish_entry(after.finished_at.timestamp(), duration))
            pipe.ltrim(self._recent_finishes, 0, RECENT_FINISHES - 1)

    def _apply(
        self,
        operation: JobOperation,
        job_id: str,
        write: Write,
        owner: str | None = None,
        now: datetime | None = None,
    ) -> Any:
        """Run `write` in one MULTI if the lifecycle allows `operation` on the record as it
        stands, retrying whenever the record changes in between (WATCH).

        Raises JobNotFound, or TransitionRefused with the current record.
        """
        rule = LIFECYCLE[operation]
        key = self._key(job_id)
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    job = EditJob.model_validate_json(raw) if raw is not None else None
                    at = now or utcnow()
                    if job is None and not rule.without_record:
                        raise JobNotFound(job_id)
                    if job is not None and not rule.allows(job, owner, at):
                        raise TransitionRefused(job)
                    pipe.multi()
                    result = write(pipe, job, at)
                    pipe.execute()
                    return result
                except redis.WatchError:
                    time.sleep(0.001)

    # -- indexes -----------------------------------------------------------------------

    def delete(self, job_id: str, owner: str | None = None, batch_key: str | None = None) -> None:
        """Remove a job's record, event stream and every index entry: undoing `create`
        (the submission failed), a DELETE, or retention. Its stored images are the
        caller's business (services/common/job_cleanup.py)."""
        with self.redis.pipeline() as pipe:
            pipe.delete(self._key(job_id), self.events_key(job_id))
            pipe.zrem(self._active, job_id)
            pipe.zrem(self._retention, job_id)
            pipe.hdel(self._owners, job_id)
            if owner is not None:
                pipe.zrem(self.owner_index(owner), job_id)
                pipe.zrem(self._owner_unfinished(owner), job_id)
            if batch_key is not None:
                pipe.zrem(self._pending_key(batch_key), job_id)
            pipe.execute()

    def owner_of(self, job_id: str) -> str | None:
        """Whose the job is, from the index kept beside the records (None: unknown)."""
        raw = self.redis.hget(self._owners, job_id)
        return raw.decode() if raw is not None else None

    def retention_due(self, now: datetime, limit: int = 100) -> list[str]:
        """Jobs whose record and images are past their retention time, oldest first."""
        ids = self.redis.zrangebyscore(self._retention, "-inf", now.timestamp(), 0, limit)
        return [i.decode() for i in ids]

    def owned(
        self,
        owner: str,
        limit: int,
        cursor: str | None = None,
        status: JobStatus | None = None,
    ) -> tuple[list[EditJob], str | None]:
        """The owner's jobs newest first (filtered by `status`), and the next page's
        cursor (listing.page; raises listing.BadCursor)."""
        keep = (lambda job: job.status == status) if status is not None else (lambda _: True)
        return page(self.redis, self.owner_index(owner), self.get_many, limit, cursor, keep)

    def unfinished_count(self) -> int:
        """Unfinished jobs of all owners: what queue backpressure measures."""
        return self.redis.zcard(self._active)

    def recent_finishes(self) -> list[bytes]:
        return self.redis.lrange(self._recent_finishes, 0, -1)

    def overdue(self, now: datetime, limit: int = 100) -> list[str]:
        """Unfinished jobs past their deadline, most overdue first."""
        ids = self.redis.zrangebyscore(self._active, "-inf", now.timestamp(), 0, limit)
        return [i.decode() for i in ids]

    # Jobs waiting for a worker, per batch key, oldest first: where a worker looks for
    # jobs to run together with the one its queue message named. A job leaves it with
    # the operation that moves it out of `queued`.
    def _pending_key(self, key: str) -> str:
        return f"{self.namespace}:pending:{key}"

    def add_pending(self, job: EditJob) -> None:
        with self.redis.pipeline() as pipe:
            pipe.sadd(self._pending_keys, job.batch_key)
            pipe.zadd(self._pending_key(job.batch_key), {job.id: job.created_at.timestamp()})
            pipe.execute()

    def queue_position(self, job: EditJob) -> tuple[int | None, float | None]:
        """Where a queued job stands: its rank among the queued jobs by creation time (1:
        next), and the estimated seconds until it starts (job_events.estimated_wait_s;
        None when unknown). (None, None) for a job that is not queued.

        Counted in the pending indexes, which are scored by creation time: one count per
        batch key, O(log n) each, and no command naming the job.
        """
        if job.status != JobStatus.queued:
            return None, None
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.smembers(self._pending_keys)
            pipe.lrange(self._recent_finishes, 0, -1)
            batch_keys, finishes = pipe.execute()
        ahead = 0
        if batch_keys:
            created = f"({job.created_at.timestamp()!r}"
            with self.redis.pipeline(transaction=False) as pipe:
                for key in batch_keys:
                    pipe.zcount(self._pending_key(key.decode()), "-inf", created)
                ahead = sum(pipe.execute())
        position = ahead + 1
        return position, estimated_wait_s(position, finishes)

    def oldest_pending(self, limit: int) -> tuple[str, list[str]] | None:
        """The batch key whose oldest pending job waits longest, and up to `limit` of its
        pending jobs, oldest first; None when no job is pending."""
        batch_keys = [k.decode() for k in self.redis.smembers(self._pending_keys)]
        if not batch_keys:
            return None
        with self.redis.pipeline(transaction=False) as pipe:
            for key in batch_keys:
                pipe.zrange(self._pending_key(key), 0, 0, withscores=True)
            oldest = pipe.execute()
        waiting = {key: first[0][1] for key, first in zip(batch_keys, oldest, strict=True) if first}
        empty = [key for key in batch_keys if key not in waiting]
        if empty:
            # A job pending meanwhile under one of them is still run by its own message.
            self.redis.srem(self._pending_keys, *empty)
        if not waiting:
            return None
        key = min(waiting, key=waiting.__getitem__)
        return key, self.pending(key, limit)

    def get_many(self, job_ids: Sequence[str]) -> list[EditJob | None]:
        """The records of `job_ids` in one round trip (None where there is none)."""
        if not job_ids:
            return []
        raws = self.redis.mget([self._key(job_id) for job_id in job_ids])
        return [None if raw is None else EditJob.model_validate_json(raw) for raw in raws]

    def pending(self, key: str, limit: int) -> list[str]:
        return [i.decode() for i in self.redis.zrange(self._pending_key(key), 0, limit - 1)]

    def remove_pending(self, key: str, *job_ids: str) -> None:
        if job_ids:
            self.redis.zrem(self._pending_key(key), *job_ids)
