"""Progress, leases and cancels off the denoising loop: the publisher thread against a real
Redis, alone and inside the runner with the tiny engine."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import timedelta

import pytest
import redis

from services.common.jobs import RECORD_GRACE_S, JobStatus, JobStore
from services.gpu_worker.edit_job import EditRunner
from services.gpu_worker.progress import ClaimLost, JobCanceled, ProgressPublisher
from tests.gpu_worker.test_edit_runner import lapse, outputs_in, submit

LEASE = timedelta(seconds=60)


def claimed(jobs, storage, steps=4, lease=LEASE):
    job = submit(jobs, storage, steps=steps)
    return jobs.claim(job.id, lease).job


# -- the publisher alone ---------------------------------------------------------------


def test_steps_are_kept_in_memory_until_a_round_publishes_them(jobs, storage):
    job = claimed(jobs, storage)
    publisher = ProgressPublisher(jobs, LEASE)  # its thread not started: rounds by hand
    publisher.hold(job)
    on_step = publisher.on_step(job.id)
    on_step(1, 4)
    on_step(2, 4)
    assert jobs.get(job.id).progress.step == 0
    publisher.publish_now()
    record = jobs.get(job.id)
    assert (record.progress.step, record.progress.total) == (2, 4)
    assert record.lease_expires_at == job.lease_expires_at  # not due yet: unchanged
    assert publisher.round_trips == 1


def test_a_round_renews_leases_that_are_due(jobs, storage):
    short = timedelta(seconds=0.3)
    job = claimed(jobs, storage, lease=short)
    publisher = ProgressPublisher(jobs, short)
    publisher.hold(job)
    publisher.publish_now()
    assert publisher.round_trips == 0  # nothing moved, not denoising, lease not due
    time.sleep(0.12)  # a third of the lease
    publisher.publish_now()
    assert publisher.round_trips == 1
    renewed = jobs.get(job.id)
    assert renewed.lease_expires_at > job.lease_expires_at
    score = jobs.redis.zscore(jobs._active, job.id)
    assert score == renewed.lease_expires_at.timestamp()
    assert 0 < jobs.redis.ttl(jobs._key(job.id)) <= 300 + RECORD_GRACE_S


@pytest.mark.parametrize("how,leaves", [("cancel", JobCanceled), ("takeover", ClaimLost)])
def test_a_round_learns_that_the_claim_is_gone_and_the_job_leaves_at_its_next_step(
    jobs, storage, how, leaves
):
    job = claimed(jobs, storage)
    publisher = ProgressPublisher(jobs, LEASE)
    publisher.hold(job)
    on_step = publisher.on_step(job.id)
    on_step(1, 4)
    publisher.publish_now()
    if how == "cancel":
        jobs.cancel(job.id)
    else:
        lapse(jobs, job)
        jobs.claim(job.id, LEASE)
    before = jobs.get(job.id)
    on_step(2, 4)  # not seen yet: the step goes on
    publisher.publish_now()
    assert publisher.leaving(job.id) is leaves
    with pytest.raises(leaves):
        on_step(3, 4)
    assert jobs.get(job.id) == before  # the refused write left the record as it was


def test_a_job_that_is_denoising_is_looked_at_every_round(jobs, storage):
    """Steps slower than a round: no progress to write, but a cancel is still seen."""
    job = claimed(jobs, storage, steps=10)
    publisher = ProgressPublisher(jobs, LEASE)
    publisher.hold(job)
    publisher.on_step(job.id)(1, 10)
    publisher.publish_now()
    publisher.publish_now()  # nothing moved: only a look
    assert publisher.round_trips == 2
    jobs.cancel(job.id)
    publisher.publish_now()
    assert publisher.leaving(job.id) is JobCanceled


def test_the_thread_publishes_at_the_end_of_the_batch_without_waiting_for_its_round(jobs, storage):
    job = claimed(jobs, storage, steps=2)
    with ProgressPublisher(jobs, LEASE, interval_s=30) as publisher:
        publisher.hold(job)
        on_step = publisher.on_step(job.id)
        with publisher.denoising([job.id]):
            on_step(1, 2)
            on_step(2, 2)  # the last step of the whole batch wakes the thread
            deadline = time.monotonic() + 5
            while jobs.get(job.id).progress.step != 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert jobs.get(job.id).progress.step == 2
        assert publisher.round_trips == 1  # leaving the block found nothing left to say


# -- inside the runner -----------------------------------------------------------------


class RedisSpy:
    """Which thread sends which Redis command, when."""

    def __init__(self, monkeypatch) -> None:
        self.sent: list[tuple[threading.Thread, float]] = []
        original = redis.connection.Connection.send_packed_command

        def send(connection, command, *args, **kwargs):
            self.sent.append((threading.current_thread(), time.monotonic()))
            return original(connection, command, *args, **kwargs)

        monkeypatch.setattr(redis.connection.Connection, "send_packed_command", send)


class SlowSteps:
    """A UNet hook: each call takes at least `seconds`; records when each call ran."""

    def __init__(self, engine, seconds: float, during=None) -> None:
        self.engine, self.seconds, self.during = engine, seconds, during
        self.calls: list[float] = []

    def __enter__(self) -> SlowSteps:
        def hook(module, args):
            self.calls.append(time.monotonic())
            if self.during:
                self.during(len(self.calls))
            time.sleep(self.seconds)

        self._hook = self.engine.pipe.unet.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()


def poll_steps(jobs: JobStore, job_id: str, stop: threading.Event) -> list[int]:
    seen: list[int] = []

    def poll() -> None:
        while not stop.is_set():
            seen.append(jobs.get(job_id).progress.step)
            time.sleep(0.02)

    threading.Thread(target=poll, daemon=True).start()
    return seen


def test_the_steps_touch_no_redis_and_progress_still_advances_in_redis(
    engine, redis_url, storage, monkeypatch
):
    jobs = JobStore(redis.Redis.from_url(redis_url), ttl_s=300)
    job = submit(jobs, storage, steps=12)
    spy = RedisSpy(monkeypatch)
    stop = threading.Event()
    seen = poll_steps(JobStore(redis.Redis.from_url(redis_url), ttl_s=300), job.id, stop)
    with SlowSteps(engine, 0.06) as steps:
        result = EditRunner(engine, jobs, storage).handle(job.id)
    stop.set()
    assert result == {job.id: JobStatus.succeeded}
    me = threading.current_thread()
    first, last = steps.calls[0], steps.calls[-1]
    assert not [t for thread, t in spy.sent if thread is me and first <= t <= last]
    # Clients see the steps advance while the job runs, and every step at the end.
    assert seen == sorted(seen)
    assert any(0 < step < 12 for step in seen)
    done = jobs.get(job.id)
    assert (done.status, done.progress.step, done.progress.total) == ("succeeded", 12, 12)


def test_progress_of_a_batch_goes_out_in_one_round_at_most_every_250_ms(
    engine, jobs, storage, monkeypatch
):
    submitted = [submit(jobs, storage, steps=12, seed=i) for i in range(3)]
    rounds: list[tuple[float, list[str]]] = []
    report_many = jobs.report_progress_many

    def spy(reports, lease):
        rounds.append((time.monotonic(), [r.job.id for r in reports]))
        return report_many(reports, lease)

    monkeypatch.setattr(jobs, "report_progress_many", spy)
    runner = EditRunner(engine, jobs, storage, max_batch=8)
    with SlowSteps(engine, 0.06) as steps:
        results = runner.handle(submitted[0].id)
    assert results == {job.id: JobStatus.succeeded for job in submitted}
    ids = sorted(job.id for job in submitted)
    assert rounds and all(sorted(names) == ids for _, names in rounds)  # the whole batch
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(rounds)]
    # Every 250 ms at most; only the round at the end of the loop may come sooner.
    assert all(gap >= 0.24 for gap in gaps[:-1]), gaps
    assert rounds[0][0] > steps.calls[0]  # none before the first step
    for job in submitted:
        assert jobs.get(job.id).progress.step == 12


def test_a_cancel_is_seen_by_the_publisher_and_the_job_stops_at_the_next_step(
    engine, jobs, storage
):
    job = submit(jobs, storage, steps=40)
    canceled_at: list[float] = []

    def cancel_once_progress_shows(calls: int) -> None:
        if not canceled_at and jobs.get(job.id).progress.step >= 3:
            jobs.cancel(job.id)  # as the API does, from elsewhere
            canceled_at.append(time.monotonic())

    with SlowSteps(engine, 0.05, during=cancel_once_progress_shows) as steps:
        results = EditRunner(engine, jobs, storage).handle(job.id)
    assert results == {job.id: JobStatus.canceled}
    assert canceled_at, "the progress never reached Redis"
    after_cancel = [t for t in steps.calls if t > canceled_at[0]]
    # Seen within a round (250 ms) of the cancel, then left at the next step: the steps
    # begun after the cancel span at most that (the job may well leave at the step it
    # was canceled in). A step lasts what it lasts on this machine.
    step_s = max(b - a for a, b in itertools.pairwise(steps.calls))
    assert len(steps.calls) < 40
    last_begun = after_cancel[-1] if after_cancel else canceled_at[0]
    assert last_begun - canceled_at[0] <= 0.25 + step_s + 0.25
    final = jobs.get(job.id)
    assert final.status == JobStatus.canceled and final.output_keys == []
    assert outputs_in(storage, job) == []
