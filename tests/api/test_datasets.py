"""/v1/datasets on the real app with a real Redis and Celery producer, no datagen worker:
what a post, a repost and a cancel leave in the run record and in the datagen queue."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
import redis

from services.common.datasets import (
    STALE_RUN_AFTER_S,
    DatasetSpec,
    RunStatus,
    RunStore,
)
from services.common.jobs import utcnow
from services.common.queues import DATAGEN_CHUNK_TASK, DATAGEN_QUEUE

SPEC = {"num_rows": 20, "seed": 1, "pairs_per_row": 1, "num_inference_steps": 2}


@pytest.fixture
def runs(settings) -> RunStore:
    return RunStore(redis.Redis.from_url(settings.redis_url), settings.job_ttl_s)


def take_queued(runs: RunStore) -> list[tuple[str, list, dict]]:
    """Empty the datagen queue; its tasks, oldest first: (name, args, kwargs)."""
    tasks = []
    while (raw := runs.redis.rpop(DATAGEN_QUEUE)) is not None:
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        tasks.append((message["headers"]["task"], args, kwargs))
    return tasks


def chunk(run_id, start, stop, generation):
    return (DATAGEN_CHUNK_TASK, [run_id, start, stop], {"generation": generation})


def test_post_queues_every_chunk_with_the_run_generation(client, runs):
    response = client.post("/v1/datasets", json=SPEC)
    assert response.status_code == 202
    run = response.json()
    assert (run["status"], run["generation"]) == ("queued", 0)
    assert run["heartbeat_at"] is not None
    assert take_queued(runs) == [
        chunk(run["id"], 0, 8, 0),
        chunk(run["id"], 8, 16, 0),
        chunk(run["id"], 16, 20, 0),
    ]


def test_a_stale_running_run_is_resumed_by_posting_it_again(client, runs):
    run_id = client.post("/v1/datasets", json=SPEC).json()["id"]
    take_queued(runs)
    # A worker started it and made rows 0-7 and 16, then went silent.
    runs.transition(run_id, {RunStatus.queued}, status=RunStatus.running, started_at=utcnow())
    for index in [*range(8), 16]:
        runs.row_done(run_id, index, generated=1, kept=1)

    # Still reporting: the same run, nothing queued again.
    again = client.post("/v1/datasets", json=SPEC).json()
    assert (again["status"], again["generation"]) == ("running", 0)
    assert take_queued(runs) == []

    runs.beat(run_id, at=utcnow() - timedelta(seconds=STALE_RUN_AFTER_S + 60))
    resumed = client.post("/v1/datasets", json=SPEC)
    assert resumed.status_code == 202
    body = resumed.json()
    assert (body["status"], body["generation"]) == ("queued", 1)
    assert body["progress"]["rows_done"] == 9  # what was made stays made
    # Only the chunks with missing rows, tagged with the new generation (the old
    # generation's tasks, if any still run, stop at their next row).
    assert take_queued(runs) == [chunk(run_id, 8, 16, 1), chunk(run_id, 16, 20, 1)]
    # Resuming renewed the heartbeat: a second post does not requeue it again.
    assert client.post("/v1/datasets", json=SPEC).json()["generation"] == 1
    assert take_queued(runs) == []


def test_a_stale_exporting_run_is_resumed_through_its_last_chunk(client, runs):
    run_id = client.post("/v1/datasets", json=SPEC).json()["id"]
    take_queued(runs)
    for index in range(20):
        runs.row_done(run_id, index, generated=1, kept=1)
    runs.transition(run_id, {RunStatus.queued}, status=RunStatus.exporting)
    runs.beat(run_id, at=utcnow() - timedelta(seconds=STALE_RUN_AFTER_S + 1))
    body = client.post("/v1/datasets", json=SPEC).json()
    assert (body["status"], body["generation"]) == ("queued", 1)
    # Every row is made: one chunk task finds nothing to make and re-enqueues the export.
    assert take_queued(runs) == [chunk(run_id, 16, 20, 1)]


def test_cancel_is_refused_once_the_run_ended(client, runs):
    run_id = client.post("/v1/datasets", json=SPEC).json()["id"]
    canceled = client.post(f"/v1/datasets/{run_id}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    again = client.post(f"/v1/datasets/{run_id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "run_finished"
    assert client.post("/v1/datasets/nope/cancel").status_code == 404
    # A canceled run resumes as the next generation.
    take_queued(runs)
    resumed = client.post("/v1/datasets", json=SPEC).json()
    assert (resumed["status"], resumed["generation"]) == ("queued", 1)
    assert DatasetSpec(**SPEC).run_id() == run_id
