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

from services.common.datasets import (
    DATAGEN_PLAN_TASK,
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
from services.datagen.builder import DatasetBuilder
from services.datagen.run_tasks import (
    RunContext,
    RunFailed,
    export_run,
    fail_run,
    generate_chunk,
    plan_run,
)
from tests.datagen.conftest_images import fake_pair

OWNER = "key-1"


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
        # No CLIP model here (the filter's own tests: test_candidates.py).
        "filter": False,
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
    run, _ = ctx.runs.create_or_resume(spec(num_rows=3, pairs_per_row=2), OWNER)
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

    def generate_candidates(self, row, params, judge=None, keep=None, **_):
        from services.datagen.pair_pipeline import RowCandidates

        pairs = [fake_pair(row.index, p.pair_index) for p in params[:keep]]
        return RowCandidates(kept=pairs, generated=pairs, batches=1)


def _store_rows(ctx: RunContext, run) -> None:
    builder = DatasetBuilder(run.id, run.spec, ctx.storage, _StoredPairs(), model="fake")
    for index in range(run.spec.total_rows):
        outcome = builder.process_row(index)
        ctx.runs.row_done(run.id, index, outcome.generated, outcome.kept)


def test_a_cancel_during_the_export_is_not_overwritten(ctx):
    run, _ = ctx.runs.create_or_resume(spec(num_rows=600), OWNER)
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
    run, requeued = runs.create_or_resume(spec(), OWNER)
    assert requeued and run.generation == 0
    runs.transition(run.id, RUN_ACTIVE, status=RunStatus.canceled)
    resumed, requeued = runs.create_or_resume(spec(), OWNER)
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
    run, _ = runs.create_or_resume(spec(), OWNER)
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
    run, _ = ctx.runs.create_or_resume(spec(), OWNER)
    # One row always fits; the next would end past this (tiny) soft limit.
    assert generate_chunk(ctx, run.id, 0, 4, run.generation, soft_limit_s=0.001) == 1
    assert queued(ctx) == [
        (DATAGEN_CHUNK_TASK, [run.id, 1, 4], {"generation": run.generation, "stalls": 0})
    ]
    assert ctx.runs.get(run.id).progress.rows_done == 1


def test_a_shutting_down_worker_hands_its_rows_back(ctx):
    run, _ = ctx.runs.create_or_resume(spec(), OWNER)
    draining = dataclasses.replace(ctx, draining=lambda: True)
    assert generate_chunk(draining, run.id, 0, 4, run.generation) == 0
    assert queued(ctx) == [
        (DATAGEN_CHUNK_TASK, [run.id, 0, 4], {"generation": run.generation, "stalls": 0})
    ]


# -- planning -----------------------------------------------------------------------------------


def chunk_tasks(run, generation=0) -> list[tuple[str, list, dict]]:
    total = run.spec.total_rows
    return [
        (DATAGEN_CHUNK_TASK, [run.id, start, min(start + 8, total)], {"generation": generation})
        for start in range(0, total, 8)
    ]


def test_planning_enqueues_the_chunks_and_goes_on_where_it_stopped(ctx, monkeypatch):
    from services.datagen import run_tasks

    monkeypatch.setattr(run_tasks, "PLAN_CHECK_EVERY", 2)
    run, _ = ctx.runs.create_or_resume(spec(num_rows=50), OWNER)
    # The worker begins to shut down after the first check: the rest goes back.
    checks = iter([False, True])
    draining = dataclasses.replace(ctx, draining=lambda: next(checks, True))
    assert plan_run(draining, run.id, run.generation) == 4
    assert queued(ctx) == [
        *chunk_tasks(run)[:4],
        (DATAGEN_PLAN_TASK, [run.id], {"generation": run.generation}),
    ]
    ctx.runs.redis.delete(DATAGEN_QUEUE)
    # The planning task sent again goes on from the fifth chunk.
    assert plan_run(ctx, run.id, run.generation) == 3
    assert queued(ctx) == chunk_tasks(run)[4:]
    ctx.runs.redis.delete(DATAGEN_QUEUE)
    assert plan_run(ctx, run.id, run.generation) == 0
    # A planning task of another generation does nothing.
    assert plan_run(ctx, run.id, run.generation + 1) == 0
    assert queued(ctx) == []


def test_planning_skips_made_rows_and_stops_for_a_cancel(ctx, monkeypatch):
    from services.datagen import run_tasks

    monkeypatch.setattr(run_tasks, "PLAN_CHECK_EVERY", 2)
    run, _ = ctx.runs.create_or_resume(spec(num_rows=48), OWNER)
    for index in range(8, 16):
        ctx.runs.row_done(run.id, index, 1, 1)
    sent = []

    def send_then_cancel(name, args, kwargs):
        sent.append((name, args, kwargs))
        if len(sent) == 2:
            ctx.runs.transition(run.id, RUN_ACTIVE, status=RunStatus.canceled)

    canceling = dataclasses.replace(ctx, send=send_then_cancel)
    assert plan_run(canceling, run.id, run.generation) == 2
    tasks = chunk_tasks(run)
    assert sent == [tasks[0], tasks[2]]  # rows 8-15 are made


def test_a_soft_time_limit_while_planning_requeues_the_planning(ctx):
    from celery.exceptions import SoftTimeLimitExceeded

    run, _ = ctx.runs.create_or_resume(spec(num_rows=40), OWNER)
    sent = []

    def send(name, args, kwargs):
        if name == DATAGEN_CHUNK_TASK and len(sent) == 3:
            raise SoftTimeLimitExceeded()
        sent.append((name, args, kwargs))

    assert plan_run(dataclasses.replace(ctx, send=send), run.id, run.generation) == 3
    assert sent == [
        *chunk_tasks(run)[:3],
        (DATAGEN_PLAN_TASK, [run.id], {"generation": run.generation}),
    ]
    assert plan_run(ctx, run.id, run.generation) == 2
    assert queued(ctx) == chunk_tasks(run)[3:]


# -- given rows and errors ------------------------------------------------------------------------


def test_given_rows_are_read_from_their_own_store(ctx):
    rows = [
        {"input_caption": f"a mug {n}", "instruction": "make it red", "output_caption": "a red mug"}
        for n in range(3)
    ]
    run, _ = ctx.runs.create_or_resume(spec(num_rows=None, rows=rows), OWNER)
    assert run.spec.rows_count == 3 and not hasattr(run.spec, "rows")
    assert generate_chunk(ctx, run.id, 0, 3, run.generation) == 3
    manifest = json.loads(ctx.storage.get(row_key(run.id, 2)))
    assert manifest["all_pairs"][0]["input_caption"] == "a mug 2"

    # Rows gone (expired apart from the record): a clear failure, not a crash.
    other, _ = ctx.runs.create_or_resume(spec(num_rows=None, rows=rows[:2]), OWNER)
    ctx.runs.redis.delete(ctx.runs._key(other.id, "input-rows"))
    with pytest.raises(RunFailed) as failed:
        generate_chunk(ctx, other.id, 0, 2, other.generation)
    assert failed.value.code == "rows_missing"


def test_a_model_that_fails_to_load_leaves_no_path_in_the_run(ctx):
    from services.datagen import celery_worker

    run, _ = ctx.runs.create_or_resume(spec(), OWNER)
    broken = dataclasses.replace(ctx, default_model="/nonexistent/secret-models/sd")
    with pytest.raises(RunFailed) as failed:
        generate_chunk(broken, run.id, 0, 4, run.generation)
    # What the task's failure handler records on the run.
    code, message = celery_worker._failure(DATAGEN_CHUNK_TASK, failed.value, [run.id, 0, 4])
    assert fail_run(ctx.runs, run.id, run.generation, code, message)
    error = ctx.runs.get(run.id).error
    assert error.code == "model_unavailable"
    assert "/" not in error.message and "secret" not in error.message

    # Any other exception: its type, never its text.
    leaky = OSError("[Errno 2] No such file: '/srv/private/thing'")
    for task in (DATAGEN_CHUNK_TASK, DATAGEN_PLAN_TASK, DATAGEN_EXPORT_TASK):
        _, message = celery_worker._failure(task, leaky, [run.id, 0, 4])
        assert "/srv" not in message and "OSError" in message
