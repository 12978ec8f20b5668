"""Per-key submission limits and queue backpressure.

- Rate: submissions per key in a moving window (INSTRUCTEDIT_RATE_LIMIT, the `limits`
  library's notation), counted in Redis by `limits`, so the limit holds across every API
  process: 429 rate_limited with Retry-After.
- Unfinished jobs per key (INSTRUCTEDIT_MAX_UNFINISHED_JOBS_PER_KEY): checked atomically
  with the job's creation (JobStore.create): 429 too_many_unfinished_jobs.
- Backpressure: above INSTRUCTEDIT_MAX_QUEUE_DEPTH unfinished jobs in all, or an estimated
  wait above INSTRUCTEDIT_MAX_QUEUE_WAIT_S, 503 queue_full with Retry-After, at once,
  instead of a job that would wait for hours.
"""

from __future__ import annotations

import math
import time

from limits import parse_many
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from services.api.errors import APIError
from services.common.job_events import estimated_wait_s
from services.common.jobs import JobStore
from services.common.settings import Settings

# Retry-After when nothing better is known, and the most it ever says.
DEFAULT_RETRY_AFTER_S = 5
MAX_RETRY_AFTER_S = 600


def _retry_after(seconds: float | None) -> dict[str, str]:
    value = DEFAULT_RETRY_AFTER_S if seconds is None else math.ceil(seconds)
    return {"Retry-After": str(min(max(value, 1), MAX_RETRY_AFTER_S))}


class SubmissionLimits:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._rates = parse_many(settings.rate_limit)
        self._limiter = MovingWindowRateLimiter(RedisStorage(settings.redis_url))

    def hit(self, key_id: str, kind: str = "submit") -> None:
        """Count one submission of `key_id`, or 429 when a window is full. Each window is
        checked and counted in one atomic step (so concurrent requests cannot slip
        through together); with several rates, a refused request still counts in the
        windows checked before the full one."""
        for rate in self._rates:
            if not self._limiter.hit(rate, kind, key_id):
                reset_at, _ = self._limiter.get_window_stats(rate, kind, key_id)
                raise APIError(
                    429,
                    "rate_limited",
                    f"more than {rate} submissions with this key; retry later",
                    headers=_retry_after(reset_at - time.time()),
                )

    def check_backlog(self, jobs: JobStore) -> None:
        """503 queue_full when the queue is deeper, or its wait longer, than configured."""
        depth = jobs.unfinished_count()
        wait = estimated_wait_s(depth + 1, jobs.recent_finishes())
        if depth < self.settings.max_queue_depth and (
            wait is None or wait <= self.settings.max_queue_wait_s
        ):
            return
        # Until the queue is back under its limits, at the pace recent jobs finished.
        over = max(depth - self.settings.max_queue_depth + 1, 1)
        per_job = wait / (depth + 1) if wait else None
        raise APIError(
            503,
            "queue_full",
            "the queue is full; retry later",
            headers=_retry_after(per_job * over if per_job else None),
        )


def too_many_unfinished(settings: Settings) -> APIError:
    return APIError(
        429,
        "too_many_unfinished_jobs",
        f"this key has {settings.max_unfinished_jobs_per_key} unfinished jobs, the most it "
        "may have; retry when some finished",
        headers=_retry_after(None),
    )


def queue_full() -> APIError:
    return APIError(503, "queue_full", "the queue is full; retry later", headers=_retry_after(None))
