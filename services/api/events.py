"""A job's changes as they happen: server-sent events, and waiting for a job to finish.

Both follow the job's event stream in Redis (services/common/job_events.py) with blocking
reads on the asyncio client: no thread is held and the record is not polled; it is read
only where an event says there is something to read (the finished job, a queue position).

Events sent (`GET /v1/edits/{id}/events`):

    status          {"status", "progress": {"step", "total"}}: the job's status changed
                    (and once at the start: where it stands)
    progress        {"step", "total"}: a denoising step was reached
    queue_position  {"queue_position", "estimated_wait_s"}: while queued, whenever a job
                    ahead left the queue (and at the start)
    completed, failed, canceled
                    the finished job, exactly as `GET /v1/edits/{id}` returns it; the
                    stream ends after it

`status`, `progress` and the final event carry the id of their entry in the job's stream,
strictly increasing; `queue_position` carries none (it is derived, not a change of the
job). Reconnecting with `Last-Event-ID` sends the job's current state first if it moved on
since that id (never the steps in between), then what follows.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio
from sse_starlette import ServerSentEvent
from starlette.concurrency import run_in_threadpool

from services.common.job_events import JobEvent, parse_event, stream_id
from services.common.jobs import FINISHED, EditJob, JobStatus, JobStore

# Heartbeat comments (sse-starlette's ping) keep proxies from closing a quiet stream.
HEARTBEAT_S = 15
# A blocking read returns at least this often, so a gone client is noticed.
BLOCK_MS = 10_000

# The final event's name per terminal status.
FINAL_EVENTS = {JobStatus.succeeded: "completed"}


def final_event_name(status: JobStatus) -> str:
    return FINAL_EVENTS.get(status, str(status))


async def _latest(client: redis.asyncio.Redis, key: str) -> tuple[str, dict] | None:
    """The newest entry of a stream: (id, fields), or None when it is empty or gone."""
    entries = await client.xrevrange(key, "+", "-", count=1)
    if not entries:
        return None
    entry_id, fields = entries[0]
    return entry_id.decode(), fields


def _status_event(event: JobEvent) -> ServerSentEvent:
    data = {"status": event.status, "progress": {"step": event.step, "total": event.total}}
    return ServerSentEvent(json.dumps(data), event="status", id=event.id or None)


def _progress_event(event: JobEvent) -> ServerSentEvent:
    data = {"step": event.step, "total": event.total}
    return ServerSentEvent(json.dumps(data), event="progress", id=event.id)


async def job_events(
    client: redis.asyncio.Redis,
    jobs: JobStore,
    job: EditJob,
    last_event_id: str | None,
    render: Callable[[EditJob], Any],
) -> AsyncIterator[ServerSentEvent]:
    """The events of `job` (read just before), from its current state to its end.

    `render` turns the finished job into the final event's body (the GET's response).
    """
    key = jobs.events_key(job.id)
    seen = stream_id(last_event_id)
    # Where the queue's stream stands, before the position is counted: a job leaving the
    # queue after that is read below, never missed.
    queue_latest = await _latest(client, jobs.queue_events_key)
    queue_cursor = queue_latest[0] if queue_latest else "0-0"
    latest = await _latest(client, key)
    if latest is not None:
        state = parse_event(*latest)
        cursor = state.id
        if state.status in FINISHED or job.status in FINISHED:
            job = await run_in_threadpool(jobs.get, job.id)
    else:
        # No stream: a job still as created (queued), or one whose stream expired.
        state = JobEvent("", job.status, job.progress.step, job.progress.total)
        cursor = "0-0"
    if job.status in FINISHED:
        if seen is None or stream_id(state.id) is None or seen < stream_id(state.id):
            yield await _final_event(job, state.id, render)
        return
    if seen is None or (state.id and seen < stream_id(state.id)):
        yield _status_event(state)

    position = None
    recount = True  # whether jobs ahead may have left the queue since the last count
    created = job.created_at.timestamp()
    while True:
        if state.status == JobStatus.queued and recount:
            recount = False
            counted, wait_s = await run_in_threadpool(jobs.queue_position, job)
            if counted is not None and counted != position:
                position = counted
                data = {"queue_position": position, "estimated_wait_s": wait_s}
                yield ServerSentEvent(json.dumps(data), event="queue_position")
        streams = {key: cursor}
        if state.status == JobStatus.queued:
            streams[jobs.queue_events_key] = queue_cursor
        reply = await client.xread(streams, block=BLOCK_MS, count=100)
        for stream, entries in reply or []:
            if stream.decode() != key:
                queue_cursor = entries[-1][0].decode()
                # Only a job submitted before this one moves it up.
                recount = recount or any(float(f[b"c"]) <= created for _, f in entries)
                continue
            for entry_id, fields in entries:
                event = parse_event(entry_id, fields)
                cursor = event.id
                if event.status in FINISHED:
                    finished = await run_in_threadpool(jobs.get, job.id)
                    yield await _final_event(finished, event.id, render)
                    return
                if event.status != state.status:
                    yield _status_event(event)
                elif (event.step, event.total) != (state.step, state.total):
                    yield _progress_event(event)
                state = event


async def _final_event(job: EditJob, event_id: str, render) -> ServerSentEvent:
    body = await run_in_threadpool(render, job)
    return ServerSentEvent(
        body.model_dump_json(), event=final_event_name(job.status), id=event_id or None
    )


async def wait_finished(
    client: redis.asyncio.Redis, jobs: JobStore, job: EditJob, timeout_s: float
) -> EditJob:
    """The job once it finished, or as it stands after `timeout_s` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    key = jobs.events_key(job.id)
    latest = await _latest(client, key)
    cursor = latest[0] if latest else "0-0"
    # Read after the stream's position: a change in between is in the stream too.
    job = await run_in_threadpool(jobs.get, job.id)
    while job.status not in FINISHED:
        remaining_ms = int((deadline - loop.time()) * 1000)
        if remaining_ms <= 0:
            break
        reply = await client.xread({key: cursor}, block=remaining_ms, count=100)
        finished = False
        for _, entries in reply or []:
            cursor = entries[-1][0].decode()
            finished = any(parse_event(*entry).status in FINISHED for entry in entries)
        if finished or not reply:
            job = await run_in_threadpool(jobs.get, job.id)
    return job
