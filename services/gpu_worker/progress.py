"""Progress, leases and cancels of the jobs a worker holds, kept off the denoising loop.

The denoising thread calls a job's `on_step` after every step. That must cost nothing
next to a GPU step, so it only records the step in memory, and raises JobCanceled or
ClaimLost when an in-memory flag says the job must leave the batch. One background thread
per runner does the talking to Redis, for every job held, in one round trip
(JobStore.report_progress_many):

- progress of every job that moved, at most every `interval_s` (250 ms), and once more
  when the whole batch reached its last step;
- the lease of every held job, when a third of it has passed (loading inputs and writing
  outputs are covered as well as the steps);
- whether the claims still hold: every job that is denoising is looked at with every
  round, so a cancel is seen within `interval_s` and the job leaves at the next step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import redis

from services.common.jobs import (
    EditJob,
    JobStatus,
    JobStore,
    Progress,
    ProgressReport,
    TransitionRefused,
)
from services.gpu_worker.engine import LeaveBatch

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25


class JobCanceled(LeaveBatch):
    """The API canceled the job: it leaves the batch at the next step."""


class ClaimLost(LeaveBatch):
    """Another worker took the job over (this one was presumed dead): leave it to them."""


StepCallback = Callable[[int, int], None]


@dataclass
class _Held:
    record: EditJob  # the record as this worker last wrote it
    renewed_at: float  # time.monotonic() of the last lease renewal
    progress: tuple[int, int]  # (step, total), written by the denoising thread only
    # Looked at every round: between its first and its last step.
    denoising: bool = False
    # Set by the publisher thread once the claim no longer holds.
    leave: type[LeaveBatch] | None = None


class ProgressPublisher:
    """The jobs a runner holds, and the thread that keeps Redis and them in step."""

    def __init__(
        self, jobs: JobStore, lease: timedelta, interval_s: float = PROGRESS_INTERVAL_S
    ) -> None:
        self.jobs = jobs
        self.lease = lease
        self.interval_s = interval_s
        self._renew_every_s = lease.total_seconds() / 3
        self._held: dict[str, _Held] = {}
        # The jobs denoising together right now; once all reached their last step the
        # thread publishes at once instead of waiting for its next round.
        self._batch: list[_Held] = []
        self._publishing = threading.Lock()  # one round trip at a time, in order
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.round_trips = 0  # report_progress_many calls made, for tests and logs

    # -- lifetime ----------------------------------------------------------------------

    def __enter__(self) -> ProgressPublisher:
        self._thread = threading.Thread(target=self._loop, name="job-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # a round stuck on a dead Redis must not hold the task

    # -- what the runner tells it ------------------------------------------------------

    def hold(self, job: EditJob) -> None:
        """A job this worker just claimed (`job` is the claim's record)."""
        total = job.progress.total
        self._held[job.id] = _Held(job, time.monotonic(), (job.progress.step, total))

    def release(self, job_id: str) -> None:
        """The job is about to end (its outcome is being recorded): nothing more to say."""
        self._held.pop(job_id, None)

    def leaving(self, job_id: str) -> type[LeaveBatch] | None:
        """JobCanceled or ClaimLost once the claim is known not to hold any more."""
        held = self._held.get(job_id)
        return held.leave if held else None

    def on_step(self, job_id: str) -> StepCallback:
        """The job's `on_step` for the engine: memory only, no Redis."""
        held = self._held[job_id]

        def on_step(step: int, total: int) -> None:
            if held.leave is not None:
                raise held.leave
            held.progress = (step, total)
            held.denoising = step < total
            if step == total and all(
                h.progress[0] >= h.progress[1] or h.leave for h in self._batch
            ):
                self._wake.set()  # the batch is done: publish now, not at the next round

        return on_step

    @contextlib.contextmanager
    def denoising(self, job_ids: Iterable[str]) -> Iterator[None]:
        """Around one engine call: its jobs' final progress is published on leaving, so
        that the record shows every step before the job succeeds."""
        batch = [self._held[job_id] for job_id in job_ids if job_id in self._held]
        self._batch = batch
        try:
            yield
        finally:
            self._batch = []
            for held in batch:
                held.denoising = False
            self.publish([held for held in batch if held.leave is None])

    def publish_now(self) -> None:
        """One round for every held job, now (what the thread does every interval)."""
        self.publish(list(self._held.values()))

    # -- the thread --------------------------------------------------------------------

    def _loop(self) -> None:
        wait = min(self.interval_s, self._renew_every_s)
        while not self._stop.is_set():
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.publish_now()
            except Exception:
                log.exception("publishing job progress failed")

    def publish(self, candidates: list[_Held]) -> None:
        """One round trip for whatever of `candidates` has something to say or to learn."""
        with self._publishing:
            now = time.monotonic()
            due: list[tuple[_Held, ProgressReport]] = []
            for held in candidates:
                if held.leave is not None or held.record.id not in self._held:
                    continue
                step, total = held.progress
                published = held.record.progress
                moved = (step, total) != (published.step, published.total)
                renew = now - held.renewed_at >= self._renew_every_s
                if moved or renew or held.denoising:
                    progress = Progress(step=step, total=total) if moved else None
                    due.append((held, ProgressReport(held.record, progress, renew)))
            if not due:
                return
            try:
                self.round_trips += 1
                outcomes = self.jobs.report_progress_many([r for _, r in due], self.lease)
            except redis.RedisError as exc:
                log.warning("could not publish the progress of jobs: %s", exc)
                return
            for (held, report), outcome in zip(due, outcomes, strict=True):
                if isinstance(outcome, EditJob):
                    held.record = outcome
                    if report.renew:
                        held.renewed_at = now
                elif isinstance(outcome, TransitionRefused) and (
                    outcome.job.status == JobStatus.canceled
                ):
                    held.leave = JobCanceled
                else:
                    held.leave = ClaimLost  # another worker holds it, or it ended elsewhere
