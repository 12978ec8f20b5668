"""What a job tells its watchers as it changes: the Redis keys and the payloads.

Every change of a job's status or progress appends one small entry to the job's event
stream (a Redis stream), in the same round trip as the change itself (JobStore, jobs.py:
inside its Lua scripts and MULTI blocks). Redis gives each entry its id (`<ms>-<n>`),
strictly increasing per stream: that id is the event's id in the API's server-sent events,
and a client that reconnects with `Last-Event-ID` is told the current state only if the
stream moved on since then. The newest entry always is the job's current state; a job
that never changed since it was created (queued) has no stream yet: its record says it.
The stream starts with the job's first change (leaving the queue) and expires the
records' TTL after that.

    <namespace>:job-events:<job id>   one entry per change after `create`: s (status),
                                      p (step), t (total)
    <namespace>:queue-events          one entry per job leaving the queue (claimed,
                                      canceled, failed): c (its created_at, as a Unix time)
    <namespace>:recent-finishes       the last RECENT_FINISHES successes, newest first:
                                      "<finished_at> <duration_s>" (Unix time, seconds)

The queue stream names no job, so that watchers of every queued job can recompute their
position when one ahead of them leaves.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

from services.common.job_lifecycle import JobStatus

# Entries kept per job (trimmed approximately): more than a job's own changes ever need,
# since only the newest one is ever read back as state.
JOB_EVENTS_MAXLEN = 64
QUEUE_EVENTS_MAXLEN = 1000
RECENT_FINISHES = 20


def job_events_key(namespace: str, job_id: str) -> str:
    return f"{namespace}:job-events:{job_id}"


def queue_events_key(namespace: str) -> str:
    return f"{namespace}:queue-events"


def recent_finishes_key(namespace: str) -> str:
    return f"{namespace}:recent-finishes"


class JobEvent(NamedTuple):
    """One entry of a job's event stream."""

    id: str
    status: JobStatus
    step: int
    total: int


def event_fields(status: str, step: int, total: int) -> dict[str, str]:
    return {"s": str(status), "p": str(step), "t": str(total)}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_event(entry_id: bytes | str, fields: dict) -> JobEvent:
    got = {_text(k): _text(v) for k, v in fields.items()}
    return JobEvent(_text(entry_id), JobStatus(got["s"]), int(got["p"]), int(got["t"]))


def stream_id(value: bytes | str | None) -> tuple[int, int] | None:
    """A stream entry id as a comparable pair; None for anything else (a client's
    Last-Event-ID is untrusted input)."""
    if value is None:
        return None
    ms, _, seq = _text(value).strip().partition("-")
    if not (ms.isdigit() and seq.isdigit()):
        return None
    return int(ms), int(seq)


def finish_entry(finished_at: float, duration_s: float) -> str:
    return f"{finished_at:.3f} {max(0.0, duration_s):.3f}"


def estimated_wait_s(position: int, finishes: list[bytes | str]) -> float | None:
    """Seconds until a job at `position` in the queue (1: next) starts, roughly.

    One job leaves the queue about every "service interval": the mean, over the recent
    successes, of the time between one success and the one before it, capped at the
    success's own duration (start to finish). With several workers, or jobs batched
    together, successes come faster than one job takes, and the interval says so; a gap
    in traffic counts no more than the job itself took. None without any recent success.
    """
    entries = []
    for raw in finishes:
        try:
            finished, duration = (float(x) for x in _text(raw).split())
        except ValueError:
            continue
        entries.append((finished, duration))
    if not entries:
        return None
    entries.sort()
    intervals = [entries[0][1]]
    for (previous, _), (finished, duration) in itertools.pairwise(entries):
        intervals.append(min(finished - previous, duration))
    interval = sum(intervals) / len(intervals)
    return round(position * interval, 1)
