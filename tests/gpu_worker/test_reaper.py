"""The reaper on a real Redis: which overdue jobs it sends to the queue again."""

import time
from datetime import timedelta

import pytest
import redis

from services.common.edit_params import EditParams
from services.common.jobs import EditJob, JobStore, utcnow
from services.gpu_worker.reaper import JobReaper


@pytest.fixture
def jobs(redis_url):
    return JobStore(redis.Redis.from_url(redis_url), ttl_s=300, redeliver_after_s=60)


def accepted(jobs) -> EditJob:
    job = EditJob.new(EditParams(prompt="make it red"), "image/png")
    jobs.create(job)
    return job


def test_a_job_queued_too_long_is_sent_again_once_per_grace_period(jobs):
    job = accepted(jobs)
    sent = []
    reaper = JobReaper(jobs, sent.append, redeliver_after_s=60)
    assert reaper.sweep(utcnow()) == []
    later = job.created_at + timedelta(seconds=61)
    assert reaper.sweep(later) == [job.id]
    assert reaper.sweep(later + timedelta(seconds=30)) == []  # its new message may be coming
    assert reaper.sweep(later + timedelta(seconds=61)) == [job.id]
    assert sent == [job.id, job.id]


def test_running_jobs_are_sent_again_only_when_their_lease_lapsed(jobs):
    live, dead = accepted(jobs), accepted(jobs)
    now = utcnow()
    jobs.claim(live.id, timedelta(seconds=600))
    jobs.claim(dead.id, timedelta(seconds=5))
    sent = []
    assert JobReaper(jobs, sent.append, 60).sweep(now + timedelta(seconds=90)) == [dead.id]


def test_finished_and_expired_jobs_leave_the_index(jobs):
    finished, expired = accepted(jobs), accepted(jobs)
    jobs.cancel(finished.id)
    jobs.redis.delete(f"instructedit:job:{expired.id}")  # its TTL ran out
    far = utcnow() + timedelta(days=1)
    sent = []
    assert JobReaper(jobs, sent.append, 60).sweep(far) == []
    assert jobs.overdue(far) == [] and sent == []


def test_only_one_worker_sweeps_per_interval(redis_url):
    store = JobStore(redis.Redis.from_url(redis_url), ttl_s=300, redeliver_after_s=0)
    job = accepted(store)
    sent = []
    # No grace: every sweep sends the job again, so the count is the number of sweeps.
    stops = [JobReaper(store, sent.append, 0).keep_sweeping(0.2) for _ in range(3)]
    time.sleep(1.0)
    for stop in stops:
        stop.set()
    # Three reapers for 1 s at 0.2 s: 15 sweeps without the lock, at most 6 with it.
    assert 1 <= len(sent) <= 6 and set(sent) == {job.id}
