"""The datagen tasks' work in-process: a real RunStore on a test Redis database, file
storage, the tiny Stable Diffusion, and a real Celery producer (tasks the code enqueues
are read back from the broker's queue)."""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import time

import pyarrow.parquet as pq
import pytest
import redis

from services.common.celery_app import create_celery_app
from services.common.datasets import (
    RUN_ACTIVE,
    STALE_RUN_AFTER_S,
    DatasetSpec,
    RunStatus,
    RunStore,
    RunTransitionRefused,
    pair_image_key,
    row_key,
)
from services.common.queues import DATAGEN_CHUNK_TASK, DATAGEN_EXPORT_TASK, DATAGEN_QUEUE
from services.common.settings import Settings
from services.common.storage import FileStorage
from services.datagen.builder import DatasetBuilder
from services.datagen.run_tasks import RunContext, export_run, generate_chunk
from tests.datagen.conftest_images import fake_pair


@pytest.fixture
def ctx(redis_url, tmp_path, tiny_sd_dir) -> RunContext:
    celery = create_celery_app(Settings(redis_url=redis_url))
    return RunContext(
        runs=RunStore(redis.Redis.from_url(redis_url), ttl_s=3600),
        storage=FileStorage(tmp_path / "store"),
        default_model=str(tiny_sd_dir),
        device="cpu",
        send=lambda name, args, kwargs: celery.send_task(
            name, args=args, kwargs=kwargs, queue=DATAGEN_QUEUE
        ),
    )


def queued(ctx: RunContext) -> list[tuple[str, list, dict]]:
    """The tasks waiting in the datagen queue, oldest first: (name, args, kwargs)."""
    tasks = []
    for raw in reversed(ctx.runs.redis.lrange(DATAGEN_QUEUE, 0, -1)):
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        tasks.append((message["headers"]["task"], args, kwargs))
    return tasks


def spec(**overrides) -> DatasetSpec:
    options = {
        "num_rows": 4,
        "seed": 3,
        "pairs_per_row": 1,
        "num_inference_steps": 2,
        "resolution": 64,
        **overrides,
    }
    return DatasetSpec(**options)


# -- export -----------------------------------------------------------------------------------


def test_datagen_tasks_have_their_own_time_limits():
    """Not the edit tasks' 900/960 s: an export of the paper's 12k pairs must fit."""
    from services.datagen import celery_worker

    app = celery_worker.app
    chunk, export = app.tasks[DATAGEN_CHUNK_TASK], app.tasks[DATAGEN_EXPORT_TASK]
    edits = Settings()
    assert export.soft_time_limit >= 2 * 3600
    assert export.time_limit > export.soft_time_limit
    assert chunk.soft_time_limit and chunk.time_limit > chunk.soft_time_limit
    assert (chunk.soft_time_limit, chunk.time_limit) != (
        edits.task_soft_time_limit_s,
        edits.task_time_limit_s,
    )
    # A running chunk is never redelivered: datagen's unacked messages have their own keys
    # and a visibility timeout above the chunk's hard limit.
    options = app.conf.broker_transport_options
    assert options["visibility_timeout"] > chunk.time_limit
    assert options["unacked_key"] != "unacked"
    # A run is stale only once a chunk would have been stopped by its soft limit.
    assert chunk.soft_time_limit < STALE_RUN_AFTER_S


def test_export_copies_the_stored_pngs_and_loads_no_model(ctx):
    run, _ = ctx.runs.create_or_resume(spec(num_rows=3, pairs_per_row=2))
    assert generate_chunk(ctx, run.id, 0, 3, run.generation) == 3
    assert ctx.runs.get(run.id).status == RunStatus.exporting
    # The chunk that finished the rows enqueued the export, for this generation.
    assert queued(ctx) == [(DATAGEN_EXPORT_TASK, [run.id], {"generation": run.generation})]

    # A worker that could not load any model still exports: it needs none.
    exporter = dataclasses.replace(ctx, default_model="/nonexistent/sd-model")
    assert export_run(exporter, run.id, run.generation)
    done = ctx.runs.get(run.id)
    assert done.status == RunStatus.succeeded
    shards = [key for key in done.export_files if key.endswith(".parquet")]
    rows = [row for key in shards for row in pq.read_table(ctx.storage.root / key).to_pylist()]
    assert len(rows) == 6
    for row in rows:
        for column, which in (("input_image", "input"), ("edited_image", "edited")):
            key = pair_image_key(run.id, row["row_index"], row["pair_index"], which)
            assert row[column]["bytes"] == ctx.storage.get(key)  # byte for byte
    card = ctx.storage.get(f"{done.export_prefix}/dataset_card.md").decode()
    assert "/nonexistent/sd-model" in card
    # Its lease is released and a second delivery of the task finds nothing to do.
    assert not ctx.runs.redis.exists(ctx.runs._key(run.id, "lease:export"))
    assert not export_run(exporter, run.id, run.generation)


class _StoredPairs:
    """Stands in for the image model to fill storage fast through the builder's real
    storing path: flat 16 px pictures."""

    def generate_row(self, row, params, **_):
        return [fake_pair(row.index, p.pair_index) for p in params]


def _store_rows(ctx: RunContext, run) -> None:
    builder = DatasetBuilder(run.id, run.spec, ctx.storage, _StoredPairs(), model="fake")
    for index in range(run.spec.total_rows):
        outcome = builder.process_row(index)
        ctx.runs.row_done(run.id, index, outcome.generated, outcome.kept)


def test_a_cancel_during_the_export_is_not_overwritten(ctx):
    run, _ = ctx.runs.create_or_resume(spec(num_rows=600))
    _store_rows(ctx, run)
    ctx.runs.transition(run.id, {RunStatus.queued}, status=RunStatus.exporting)
    lease = ctx.runs._key(run.id, "lease:export")
    result = {}
    exporter = threading.Thread(
        target=lambda: result.update(exported=export_run(ctx, run.id, run.generation))
    )
    exporter.start()
    deadline = time.monotonic() + 30
    while not ctx.runs.redis.exists(lease):  # the export has started
        assert time.monotonic() < deadline and exporter.is_alive()
        time.sleep(0.001)
    canceled = ctx.runs.transition(run.id, RUN_ACTIVE, status=RunStatus.canceled)
    assert canceled.status == RunStatus.canceled
    exporter.join(60)
    assert result == {"exported": False}
    final = ctx.runs.get(run.id)
    assert final.status == RunStatus.canceled and final.export_files == []


# -- generations and compare-and-set ------------------------------------------------------------


def test_tasks_of_a_generation_before_a_cancel_and_resume_do_nothing(ctx):
    runs = ctx.runs
    run, requeued = runs.create_or_resume(spec())
    assert requeued and run.generation == 0
    runs.transition(run.id, RUN_ACTIVE, status=RunStatus.canceled)
    resumed, requeued = runs.create_or_resume(spec())
    assert requeued and resumed.generation == 1 and resumed.status == RunStatus.queued

    # A chunk task queued before the cancel: no row, no state change.
    assert generate_chunk(ctx, run.id, 0, 4, generation=0) == 0
    after = runs.get(run.id)
    assert (after.status, after.progress.rows_done) == (RunStatus.queued, 0)
    assert not ctx.storage.exists(row_key(run.id, 0))

    assert generate_chunk(ctx, run.id, 0, 2, generation=1) == 2
    assert runs.get(run.id).status == RunStatus.running
    # An old task arriving mid-run does nothing either.
    assert generate_chunk(ctx, run.id, 2, 4, generation=0) == 0
    assert runs.get(run.id).progress.rows_done == 2
    assert generate_chunk(ctx, run.id, 2, 4, generation=1) == 2
    assert runs.get(run.id).status == RunStatus.exporting


def test_transition_is_compare_and_set(ctx, redis_url):
    """A cancel landing between a worker's read and its write wins (the write is retried
    on the new record and refused)."""
    runs = ctx.runs
    run, _ = runs.create_or_resume(spec())
    other = RunStore(redis.Redis.from_url(redis_url), ttl_s=3600)
    seen = []

    def cancel_meanwhile(current) -> bool:
        if not seen:
            other.transition(run.id, RUN_ACTIVE, status=RunStatus.canceled)
        seen.append(current.status)
        return True

    with pytest.raises(RunTransitionRefused) as refused:
        runs.transition(run.id, {RunStatus.queued}, when=cancel_meanwhile, status=RunStatus.running)
    assert refused.value.run.status == RunStatus.canceled
    assert seen == [RunStatus.queued]
    assert runs.get(run.id).status == RunStatus.canceled


# -- stopping between rows ----------------------------------------------------------------------


def test_a_chunk_near_its_time_limit_hands_its_other_rows_back(ctx):
    run, _ = ctx.runs.create_or_resume(spec())
    # One row always fits; the next would end past this (tiny) soft limit.
    assert generate_chunk(ctx, run.id, 0, 4, run.generation, soft_limit_s=0.001) == 1
    assert queued(ctx) == [
        (DATAGEN_CHUNK_TASK, [run.id, 1, 4], {"generation": run.generation, "stalls": 0})
    ]
    assert ctx.runs.get(run.id).progress.rows_done == 1


def test_a_shutting_down_worker_hands_its_rows_back(ctx):
    run, _ = ctx.runs.create_or_resume(spec())
    draining = dataclasses.replace(ctx, draining=lambda: True)
    assert generate_chunk(draining, run.id, 0, 4, run.generation) == 0
    assert queued(ctx) == [
        (DATAGEN_CHUNK_TASK, [run.id, 0, 4], {"generation": run.generation, "stalls": 0})
    ]
