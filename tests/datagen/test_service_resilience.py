"""How datagen runs survive time limits, errors and shutdowns: real datagen Celery worker
processes with the tiny Stable Diffusion, a real Redis and file storage.

Tasks are sent the way the API sends them, some with per-message time limits (a Celery
feature) so that the limits strike within a test's seconds.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
import redis

from services.common.celery_app import create_celery_app
from services.common.datasets import DatasetRun, DatasetSpec, RunStatus, RunStore
from services.common.queues import DATAGEN_CHUNK_TASK, DATAGEN_QUEUE
from services.common.settings import Settings
from services.datagen.tiny_sd import write_tiny_stable_diffusion
from tests.stack import service_env, start_datagen_worker

pytestmark = pytest.mark.e2e


class Stack:
    def __init__(self, redis_url: str, storage: Path, model: Path, logs: Path) -> None:
        self.redis_url = redis_url
        self.storage = storage
        self.logs = logs
        self.env = service_env(
            redis_url=redis_url,
            storage_url=f"file://{storage}",
            datagen_model=str(model),
            device="cpu",
        )
        self.runs = RunStore(redis.Redis.from_url(redis_url), 3600)
        self.celery = create_celery_app(Settings(redis_url=redis_url))

    def create(self, **overrides) -> DatasetRun:
        options = {
            "num_rows": 4,
            "seed": 7,
            "pairs_per_row": 1,
            # ~0.6 s a row on a CPU: long enough for limits and signals to land mid-chunk.
            "num_inference_steps": 20,
            "resolution": 64,
            "filter": False,
            **overrides,
        }
        run, requeued = self.runs.create_or_resume(DatasetSpec(**options), "key-1")
        assert requeued
        return run

    def send_chunk(self, run: DatasetRun, start: int, stop: int, **limits) -> None:
        self.celery.send_task(
            DATAGEN_CHUNK_TASK,
            args=[run.id, start, stop],
            kwargs={"generation": run.generation},
            queue=DATAGEN_QUEUE,
            **limits,
        )

    def record(self, run_id: str) -> DatasetRun:
        # The record alone: some tests break the progress keys on purpose.
        return self.runs._record(self.runs.redis, run_id)

    def wait(self, run_id: str, statuses, timeout: float = 180) -> DatasetRun:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.record(run_id)
            if run.status in statuses:
                return run
            time.sleep(0.1)
        raise TimeoutError(run)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def stack(claim_redis_db, tmp_path_factory, model):
    stack = Stack(
        claim_redis_db(),
        tmp_path_factory.mktemp("storage"),
        model,
        tmp_path_factory.mktemp("logs"),
    )
    worker = start_datagen_worker(stack.env, stack.logs)
    stack.worker = worker
    # Warm up: the model loaded, so that the tests' limits strike in their rows.
    warmup = stack.create(num_rows=1, seed=1, num_inference_steps=2)
    stack.send_chunk(warmup, 0, 1)
    assert stack.wait(warmup.id, {RunStatus.succeeded, RunStatus.failed}).status == "succeeded"
    yield stack
    worker.stop()


def test_a_soft_time_limit_mid_chunk_continues_the_run(stack):
    # Rows of ~1 s on an idle 2-core machine (150 steps; 20 steps took less than the limit
    # there): the soft limit strikes in the middle of the first row however fast it is.
    run = stack.create(num_rows=3, num_inference_steps=150)
    stack.send_chunk(run, 0, 3, soft_time_limit=0.3, time_limit=120)
    done = stack.wait(run.id, {RunStatus.succeeded, RunStatus.failed})
    assert done.status == RunStatus.succeeded, done.error
    assert stack.runs.get(run.id).progress.rows_done == 3
    assert f"soft time limit reached at row 0 of dataset run {run.id}" in stack.worker.log()


def test_a_hard_time_limit_fails_the_run_with_the_reason(stack):
    # A first row of ~4 s on an idle 2-core machine (a row of 60 steps and 2 pairs took
    # 0.9 s there, finished within the limit and let the rows continue without it): a
    # chunk always starts its first row, and this one outlives the limit.
    run = stack.create(num_rows=8, seed=8, num_inference_steps=150, pairs_per_row=4)
    # Celery's prefork pool arms the hard limit when the soft one strikes (here: at once
    # after it), the way a row stuck in native code outlives its soft limit.
    stack.send_chunk(run, 0, 8, soft_time_limit=1, time_limit=1)
    failed = stack.wait(run.id, {RunStatus.failed, RunStatus.succeeded}, timeout=60)
    assert failed.status == RunStatus.failed
    assert failed.error.code == "time_limit_exceeded"
    assert "rows 0-8" in failed.error.message and "hard time limit" in failed.error.message


def test_an_unexpected_redis_error_fails_the_run_instead_of_leaving_it_running(stack):
    run = stack.create(num_rows=2, seed=9)
    rows_key = stack.runs._key(run.id, "rows")
    stack.runs.redis.set(rows_key, "not a set")  # every read of the rows done now fails
    stack.send_chunk(run, 0, 2)
    failed = stack.wait(run.id, {RunStatus.failed, RunStatus.succeeded}, timeout=60)
    assert failed.status == RunStatus.failed
    assert failed.error.code == "worker_error"
    # The exception's type, not its text (which may carry a server path).
    assert failed.error.message == "rows 0-2: ResponseError"


def test_a_storage_outage_is_retried_and_the_run_goes_on(stack):
    run = stack.create(num_rows=2, seed=10)
    # A file where the run's folder goes: every write of the run fails, like a store down.
    blocker = stack.storage / "datasets" / run.id
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")
    stack.send_chunk(run, 0, 2)
    deadline = time.monotonic() + 120
    while "retry 1 of" not in stack.worker.log():
        assert time.monotonic() < deadline, stack.worker.log()[-3000:]
        assert stack.record(run.id).status != RunStatus.failed
        time.sleep(0.1)
    blocker.unlink()  # the store is back
    done = stack.wait(run.id, {RunStatus.succeeded, RunStatus.failed})
    assert done.status == RunStatus.succeeded, done.error
    assert stack.runs.get(run.id).progress.rows_done == 2


def queued_chunks(runs: RunStore) -> list[tuple[list, dict]]:
    tasks = []
    for raw in reversed(runs.redis.lrange(DATAGEN_QUEUE, 0, -1)):
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        tasks.append((args, kwargs))
    return tasks


def test_sigterm_stops_a_chunk_after_its_row_and_requeues_the_rest(
    claim_redis_db, tmp_path_factory, model
):
    # A Redis database of its own: the module's worker must not take these tasks.
    stack = Stack(
        claim_redis_db(), tmp_path_factory.mktemp("storage"), model, tmp_path_factory.mktemp("l")
    )
    run = stack.create(num_rows=8, seed=11, num_inference_steps=30)
    stack.send_chunk(run, 0, 8)
    first = start_datagen_worker(stack.env, stack.logs, name="first")
    try:
        deadline = time.monotonic() + 120
        while stack.runs.get(run.id).progress.rows_done < 1:
            assert time.monotonic() < deadline, first.log()[-3000:]
            time.sleep(0.05)
    finally:
        first.stop(timeout=30)  # SIGTERM: warm shutdown
    made = stack.runs.get(run.id).progress.rows_done
    # It finished the row in progress, not the whole chunk, and handed the rest back.
    assert 1 <= made < 8, first.log()[-3000:]
    assert queued_chunks(stack.runs) == [
        ([run.id, made, 8], {"generation": run.generation, "stalls": 0})
    ]
    assert stack.record(run.id).status == RunStatus.running

    second = start_datagen_worker(stack.env, stack.logs, name="second")
    try:
        done = stack.wait(run.id, {RunStatus.succeeded, RunStatus.failed})
    finally:
        second.stop()
    assert done.status == RunStatus.succeeded, done.error
    assert stack.runs.get(run.id).progress.rows_done == 8
