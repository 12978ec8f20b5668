"""/v1/datasets on the real app with a real Redis and Celery producer, no datagen worker:
what a post, a repost, a listing and a cancel leave in the run records and in the datagen
queue. Requests carry API keys (auth "required"); the planning task a post queues is run
in-process where a test needs the chunk tasks it enqueues."""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta

import pytest
import redis
from fastapi.testclient import TestClient

from services.api.main import create_app
from services.common.api_keys import KeyStore
from services.common.celery_app import create_celery_app
from services.common.datasets import (
    DATAGEN_PLAN_TASK,
    MAX_SPEC_BYTES,
    MAX_SPEC_ROWS,
    STALE_RUN_AFTER_S,
    DatasetSpec,
    RunStatus,
    RunStore,
)
from services.common.jobs import utcnow
from services.common.queues import DATAGEN_CHUNK_TASK, DATAGEN_QUEUE
from services.datagen.run_tasks import RunContext, plan_run

SPEC = {"num_rows": 20, "seed": 1, "pairs_per_row": 1, "num_inference_steps": 2}
ALLOWED_MODELS = ("sd-small", "sd-large")
ALLOWED_CLIP_MODELS = ("clip-base",)


@pytest.fixture
def app(settings):
    app = create_app(
        settings.model_copy(
            update={
                "auth": "required",
                "datagen_models": ALLOWED_MODELS,
                "datagen_clip_models": ALLOWED_CLIP_MODELS,
            }
        )
    )
    if not hasattr(app.state, "keys"):  # until the app sets its key store itself
        app.state.keys = KeyStore(app.state.redis)
    return app


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        yield c


class As:
    """Requests of one API key."""

    def __init__(self, client: TestClient, key_id: str, key: str) -> None:
        self.client = client
        self.key_id = key_id
        self.headers = {"Authorization": f"Bearer {key}"}

    def get(self, url: str, **kwargs):
        return self.client.get(url, headers=self.headers, **kwargs)

    def post(self, url: str, **kwargs):
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return self.client.post(url, headers=headers, **kwargs)


def _caller(app, client, name: str) -> As:
    created = app.state.keys.create(name)
    return As(client, created.id, created.key)


@pytest.fixture
def alice(app, client) -> As:
    return _caller(app, client, "alice")


@pytest.fixture
def bob(app, client) -> As:
    return _caller(app, client, "bob")


@pytest.fixture
def runs(settings) -> RunStore:
    return RunStore(redis.Redis.from_url(settings.redis_url), settings.job_ttl_s)


@pytest.fixture
def plan(settings, runs):
    """Run a queued planning task in-process: what a datagen worker does with it."""
    celery = create_celery_app(settings)
    ctx = RunContext(
        runs=runs,
        storage=None,
        default_model="unused",
        device="cpu",
        send=lambda name, args, kwargs: celery.send_task(
            name, args=args, kwargs=kwargs, queue=DATAGEN_QUEUE
        ),
    )

    def run(task: tuple[str, list, dict]) -> int:
        name, args, kwargs = task
        assert name == DATAGEN_PLAN_TASK
        return plan_run(ctx, *args, **kwargs)

    return run


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


def planning(run_id, generation):
    return (DATAGEN_PLAN_TASK, [run_id], {"generation": generation})


def row(n: int, width: int = 20) -> dict:
    # Padded with letters (one long word), not punctuation: a row must pass the data
    # audit, whose CLIP token estimate counts every punctuation mark.
    return {
        "input_caption": f"a mug {n}".ljust(width, "x"),
        "instruction": f"make it red {n}".ljust(width, "x"),
        "output_caption": f"a red mug {n}".ljust(width, "x"),
    }


# -- queueing -----------------------------------------------------------------------------------


def test_post_queues_one_planning_task_that_queues_every_chunk(alice, runs, plan):
    response = alice.post("/v1/datasets", json=SPEC)
    assert response.status_code == 202
    run = response.json()
    assert (run["status"], run["generation"], run["owner"]) == ("queued", 0, alice.key_id)
    assert run["heartbeat_at"] is not None
    assert response.headers["location"] == f"/v1/datasets/{run['id']}"
    [task] = take_queued(runs)
    assert task == planning(run["id"], 0)
    assert plan(task) == 3
    assert take_queued(runs) == [
        chunk(run["id"], 0, 8, 0),
        chunk(run["id"], 8, 16, 0),
        chunk(run["id"], 16, 20, 0),
    ]
    # A second delivery of the planning task goes on from where the first one ended.
    assert plan(task) == 0
    assert take_queued(runs) == []


def test_a_million_row_post_answers_at_once_with_one_message(alice, runs):
    started = time.monotonic()
    response = alice.post("/v1/datasets", json={**SPEC, "num_rows": 1_000_000})
    elapsed = time.monotonic() - started
    assert response.status_code == 202
    assert elapsed < 1.0, elapsed
    assert take_queued(runs) == [planning(response.json()["id"], 0)]


def test_a_stale_running_run_is_resumed_by_posting_it_again(alice, runs, plan):
    run_id = alice.post("/v1/datasets", json=SPEC).json()["id"]
    plan(*take_queued(runs))
    take_queued(runs)
    # A worker started it and made rows 0-7 and 16, then went silent.
    runs.transition(run_id, {RunStatus.queued}, status=RunStatus.running, started_at=utcnow())
    for index in [*range(8), 16]:
        runs.row_done(run_id, index, generated=1, kept=1)

    # Still reporting: the same run, nothing queued again.
    again = alice.post("/v1/datasets", json=SPEC).json()
    assert (again["status"], again["generation"]) == ("running", 0)
    assert take_queued(runs) == []

    runs.beat(run_id, at=utcnow() - timedelta(seconds=STALE_RUN_AFTER_S + 60))
    resumed = alice.post("/v1/datasets", json=SPEC)
    assert resumed.status_code == 202
    body = resumed.json()
    assert (body["status"], body["generation"]) == ("queued", 1)
    assert body["progress"]["rows_done"] == 9  # what was made stays made
    # Only the chunks with missing rows, tagged with the new generation (the old
    # generation's tasks, if any still run, stop at their next row).
    [task] = take_queued(runs)
    assert task == planning(run_id, 1)
    plan(task)
    assert take_queued(runs) == [chunk(run_id, 8, 16, 1), chunk(run_id, 16, 20, 1)]
    # Resuming renewed the heartbeat: a second post does not requeue it again.
    assert alice.post("/v1/datasets", json=SPEC).json()["generation"] == 1
    assert take_queued(runs) == []


def test_a_stale_exporting_run_is_resumed_through_its_last_chunk(alice, runs, plan):
    run_id = alice.post("/v1/datasets", json=SPEC).json()["id"]
    take_queued(runs)
    for index in range(20):
        runs.row_done(run_id, index, generated=1, kept=1)
    runs.transition(run_id, {RunStatus.queued}, status=RunStatus.exporting)
    runs.beat(run_id, at=utcnow() - timedelta(seconds=STALE_RUN_AFTER_S + 1))
    body = alice.post("/v1/datasets", json=SPEC).json()
    assert (body["status"], body["generation"]) == ("queued", 1)
    plan(*take_queued(runs))
    # Every row is made: one chunk task finds nothing to make and re-enqueues the export.
    assert take_queued(runs) == [chunk(run_id, 16, 20, 1)]


def test_planning_stops_for_a_canceled_run(alice, runs, plan):
    run_id = alice.post("/v1/datasets", json=SPEC).json()["id"]
    [task] = take_queued(runs)
    assert alice.post(f"/v1/datasets/{run_id}/cancel").status_code == 200
    assert plan(task) == 0
    assert take_queued(runs) == []


# -- cancel -------------------------------------------------------------------------------------


def test_cancel_twice_is_the_canceled_run_and_a_finished_run_refuses(alice, runs):
    run_id = alice.post("/v1/datasets", json=SPEC).json()["id"]
    canceled = alice.post(f"/v1/datasets/{run_id}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    again = alice.post(f"/v1/datasets/{run_id}/cancel")
    assert again.status_code == 200
    assert again.json()["status"] == "canceled"
    assert again.json()["finished_at"] == canceled.json()["finished_at"]
    assert alice.post("/v1/datasets/nope/cancel").status_code == 404
    # A canceled run resumes as the next generation.
    take_queued(runs)
    resumed = alice.post("/v1/datasets", json=SPEC).json()
    assert (resumed["status"], resumed["generation"]) == ("queued", 1)
    assert DatasetSpec(**SPEC).run_id(alice.key_id) == run_id

    for ended in (RunStatus.succeeded, RunStatus.failed):
        runs.transition(run_id, {RunStatus.queued, RunStatus.succeeded}, status=ended)
        refused = alice.post(f"/v1/datasets/{run_id}/cancel")
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "run_finished"
        assert alice.get(f"/v1/datasets/{run_id}").json()["status"] == ended


# -- ownership ----------------------------------------------------------------------------------


def test_runs_belong_to_the_key_that_created_them(client, alice, bob, runs):
    mine = alice.post("/v1/datasets", json=SPEC).json()
    theirs = bob.post("/v1/datasets", json=SPEC).json()
    # The same spec from two keys: two runs, each its owner's.
    assert mine["id"] != theirs["id"]
    assert (mine["owner"], theirs["owner"]) == (alice.key_id, bob.key_id)
    assert (mine["generation"], theirs["generation"]) == (0, 0)

    # Another key's run is exactly as missing as a run that does not exist.
    missing_id = "0" * 20
    for request in (
        lambda run_id: bob.get(f"/v1/datasets/{run_id}"),
        lambda run_id: bob.post(f"/v1/datasets/{run_id}/cancel"),
    ):
        other, missing = request(mine["id"]), request(missing_id)
        assert other.status_code == missing.status_code == 404
        assert other.json()["error"]["code"] == missing.json()["error"]["code"] == "run_not_found"
        assert (
            other.json()["error"]["message"].replace(mine["id"], missing_id)
            == (missing.json()["error"]["message"])
        )
    # Bob's cancel left Alice's run alone.
    assert alice.get(f"/v1/datasets/{mine['id']}").json()["status"] == "queued"
    assert [r["id"] for r in bob.get("/v1/datasets").json()["data"]] == [theirs["id"]]
    assert [r["id"] for r in alice.get("/v1/datasets").json()["data"]] == [mine["id"]]

    # No key, no runs.
    for response in (
        client.get("/v1/datasets"),
        client.get(f"/v1/datasets/{mine['id']}"),
        client.post("/v1/datasets", json=SPEC),
        client.post(f"/v1/datasets/{mine['id']}/cancel"),
    ):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"


# -- listing ------------------------------------------------------------------------------------


def test_listing_is_newest_first_paginated_and_filtered(alice, bob, runs):
    ids = [
        alice.post("/v1/datasets", json={**SPEC, "seed": seed}).json()["id"] for seed in range(5)
    ]
    bob.post("/v1/datasets", json=SPEC)
    newest_first = ids[::-1]

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = alice.get("/v1/datasets", params=params).json()
        pages += 1
        assert len(body["data"]) <= 2
        seen += [r["id"] for r in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == newest_first and pages == 3
    default = alice.get("/v1/datasets").json()
    assert [r["id"] for r in default["data"]] == newest_first
    assert default["next_cursor"] is None
    assert default["data"][0]["progress"]["rows_total"] == 20

    alice.post(f"/v1/datasets/{ids[1]}/cancel")
    alice.post(f"/v1/datasets/{ids[3]}/cancel")
    canceled = alice.get("/v1/datasets", params={"status": "canceled"}).json()
    assert [r["id"] for r in canceled["data"]] == [ids[3], ids[1]]
    queued = alice.get("/v1/datasets", params={"status": "queued", "limit": 100}).json()
    assert [r["id"] for r in queued["data"]] == [ids[4], ids[2], ids[0]]

    # A run whose record expired drops out of the listing.
    runs.redis.delete(runs._key(ids[4]))
    assert [r["id"] for r in alice.get("/v1/datasets").json()["data"]] == newest_first[1:]


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"cursor": "not-a-cursor"}, "invalid_cursor"),
        ({"cursor": "!!!"}, "invalid_cursor"),
        ({"limit": 0}, "invalid_limit"),
        ({"limit": 101}, "invalid_limit"),
        ({"status": "lost"}, "invalid_status"),
    ],
)
def test_listing_refuses_bad_parameters(alice, params, code):
    response = alice.get("/v1/datasets", params=params)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == code


# -- models -------------------------------------------------------------------------------------


def test_models_come_from_the_allow_lists_only(alice, runs):
    refusals = []
    for model in ("/etc/passwd", "/nonexistent/sd-model", "../../models", "runwayml/sd-v1-5"):
        response = alice.post("/v1/datasets", json={**SPEC, "model": model})
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "invalid_model"
        refusals.append(response.json()["error"]["message"])
    # The same answer whether the path exists or not, naming only what is allowed.
    assert len(set(refusals)) == 1
    message = refusals[0]
    assert "/etc" not in message and "passwd" not in message
    assert all(model in message for model in ALLOWED_MODELS)

    clip = alice.post("/v1/datasets", json={**SPEC, "filter": True, "clip_model": "/tmp/clip"})
    assert clip.status_code == 422
    assert clip.json()["error"]["code"] == "invalid_clip_model"
    assert "/tmp" not in clip.json()["error"]["message"]
    assert take_queued(runs) == [] and alice.get("/v1/datasets").json()["data"] == []

    chosen = alice.post(
        "/v1/datasets", json={**SPEC, "model": "sd-large", "clip_model": "clip-base"}
    )
    assert chosen.status_code == 202
    assert chosen.json()["spec"]["model"] == "sd-large"
    assert alice.post("/v1/datasets", json={**SPEC, "model": None}).status_code == 202


def test_without_allow_lists_only_the_server_defaults_are_accepted(settings, runs):
    app = create_app(settings.model_copy(update={"auth": "disabled"}))
    with TestClient(app) as client:
        refused = client.post("/v1/datasets", json={**SPEC, "model": "sd-small"})
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "invalid_model"
        refused = client.post("/v1/datasets", json={**SPEC, "clip_model": "clip-base"})
        assert refused.json()["error"]["code"] == "invalid_clip_model"
        accepted = client.post("/v1/datasets", json=SPEC)
        assert accepted.status_code == 202
        assert accepted.json()["owner"] == "local"


# -- given rows ---------------------------------------------------------------------------------


def test_given_rows_are_stored_apart_from_the_record(alice, runs):
    rows = [row(n) for n in range(50)]
    spec = {**SPEC, "num_rows": None, "rows": rows}
    response = alice.post("/v1/datasets", json=spec)
    assert response.status_code == 202
    run = response.json()
    assert "rows" not in run["spec"]
    assert run["spec"]["rows_count"] == 50 and len(run["spec"]["rows_sha256"]) == 64
    assert run["progress"]["rows_total"] == 50
    # The record is small; a worker reads a row by its index.
    assert len(runs.redis.get(runs._key(run["id"]))) < 2_000
    assert runs.input_row(run["id"], 37).model_dump() == {
        **rows[37],
        "category": "custom",
        "edit_type": "custom",
    }
    assert runs.get(run["id"]).spec.total_rows == 50
    # The same rows again: the same run. Other rows: another run.
    assert alice.post("/v1/datasets", json=spec).json()["id"] == run["id"]
    other = alice.post("/v1/datasets", json={**spec, "rows": rows[:-1]}).json()
    assert other["id"] != run["id"] and other["spec"]["rows_count"] == 49


def test_the_largest_spec_fits_the_body_limit(alice, runs):
    rows = [
        row(n, width=300) | {"category": "c" * 64, "edit_type": "e" * 64}
        for n in range(MAX_SPEC_ROWS)
    ]
    body = json.dumps({**SPEC, "num_rows": None, "rows": rows}, indent=2).encode()
    assert len(body) < MAX_SPEC_BYTES
    response = alice.post(
        "/v1/datasets", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 202, response.text[:500]
    run_id = response.json()["id"]
    assert runs.redis.llen(runs._key(run_id, "input-rows")) == MAX_SPEC_ROWS
    assert len(runs.redis.get(runs._key(run_id))) < 2_000


def test_bodies_over_the_bound_are_refused(alice, runs):
    too_big = b'{"num_rows": 1, "pad": "' + b"x" * MAX_SPEC_BYTES + b'"}'
    declared = alice.post(
        "/v1/datasets", content=too_big, headers={"Content-Type": "application/json"}
    )
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "payload_too_large"

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"num_rows": 1, "pad": "'
        for _ in range(MAX_SPEC_BYTES // (1 << 20) + 1):
            yield b"x" * (1 << 20)
        yield b'"}'

    streamed = alice.post(
        "/v1/datasets", content=chunked(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    assert streamed.json()["error"]["code"] == "payload_too_large"
    assert take_queued(runs) == []


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        ({**SPEC, "num_rows": None, "rows": []}, "invalid_rows"),
        ({**SPEC, "num_rows": 0}, "invalid_num_rows"),
        ({**SPEC, "num_rows": 1_000_001}, "invalid_num_rows"),
        ({**SPEC, "rows": [row(1)]}, "invalid_body"),  # both
    ],
)
def test_empty_and_impossible_specs_are_refused(alice, runs, spec, code):
    response = alice.post("/v1/datasets", json=spec)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == code
    assert take_queued(runs) == []


def test_invalid_json_is_still_described(alice):
    response = alice.post(
        "/v1/datasets", content=b'{"num_rows": ', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_json"


# -- rows are audited; captions are mapped --------------------------------------------------


def test_given_rows_that_fail_the_audit_are_refused_with_each_rule_s_rows(alice, runs):
    rows = [row(n) for n in range(5)]
    rows[2] = {
        "input_caption": "a navy blue external hard drive on a marble countertop",
        "instruction": "make it rain",
        "output_caption": "a navy blue external hard drive on a marble countertop, in the rain",
    }
    rows[4] = {
        "input_caption": "a wool scarf on a wooden shelf",
        "instruction": "give it a textured texture",
        "output_caption": "a textured wool scarf on a wooden shelf",
    }
    response = alice.post("/v1/datasets", json={**SPEC, "num_rows": None, "rows": rows})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "rows_fail_audit"
    assert "setting_contradiction (1)" in error["message"]
    by_rule = {detail["name"]: detail for detail in error["details"]}
    assert set(by_rule) == {"setting_contradiction", "duplicated_words"}
    assert by_rule["setting_contradiction"]["count"] == 1
    assert by_rule["setting_contradiction"]["examples"][0]["row"] == 2
    assert by_rule["duplicated_words"]["examples"][0]["row"] == 4
    assert by_rule["duplicated_words"]["examples"][0]["field"] == "instruction"
    # Nothing was made of the refused spec.
    assert alice.get("/v1/datasets").json()["data"] == []


CAPTIONS = [
    "black hoodie",
    {"caption": "a red leather handbag on a marble countertop", "id": "sku-7"},
    {"caption": "a pair of white sneakers in a city park", "category": "footwear"},
]


def test_captions_are_mapped_to_rows_the_run_is_made_of(alice, runs):
    spec = {**SPEC, "num_rows": None, "captions": CAPTIONS, "edits_per_caption": 2}
    response = alice.post("/v1/datasets", json=spec)
    assert response.status_code == 202, response.text
    run = response.json()
    assert run["spec"]["rows_count"] == 6 and run["progress"]["rows_total"] == 6
    stored = [runs.input_row(run["id"], index) for index in range(6)]
    assert [row.input_caption for row in stored] == [
        "black hoodie",
        "black hoodie",
        "a red leather handbag on a marble countertop",
        "a red leather handbag on a marble countertop",
        "a pair of white sneakers in a city park",
        "a pair of white sneakers in a city park",
    ]
    for row_ in stored:
        assert row_.edit_type != "custom" and row_.output_caption != row_.input_caption
    assert {row_.category for row_ in stored} == {"apparel", "bags_accessories", "footwear"}
    # Mapping is a function of the captions and the seed: the same post, the same run.
    assert alice.post("/v1/datasets", json=spec).json()["id"] == run["id"]
    other_seed = alice.post("/v1/datasets", json={**spec, "seed": 2}).json()
    assert other_seed["id"] != run["id"]


def test_captions_that_cannot_be_mapped_are_refused_with_their_reasons(alice):
    captions = ["black hoodie", "a bottle of olive oil", {"caption": "a mug", "category": "cars"}]
    response = alice.post("/v1/datasets", json={**SPEC, "num_rows": None, "captions": captions})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "captions_unmapped"
    assert [detail["index"] for detail in error["details"]] == [1, 2]
    assert error["details"][0]["caption"] == "a bottle of olive oil"
    assert "product" in error["details"][0]["reason"]
    assert "cars" in error["details"][1]["reason"]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"captions": ["black hoodie"]}, "invalid_body"),  # with num_rows
        ({"edit_types": ["camera_view"]}, "invalid_edit_types"),
        ({"max_attributes": 0}, "invalid_max_attributes"),
        ({"num_rows": None, "captions": ["x"] * 2_001}, "invalid_captions"),
    ],
)
def test_bad_text_options_are_refused(alice, change, code):
    response = alice.post("/v1/datasets", json={**SPEC, **change})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == code, response.text


def test_a_synthesized_run_keeps_its_text_options(alice, runs):
    from services.datagen.builder import caption_row

    spec = {**SPEC, "edit_types": ["text_print", "logo_print"], "max_attributes": 1}
    run = alice.post("/v1/datasets", json=spec).json()
    stored = runs.get(run["id"]).spec
    assert stored.edit_types == ["logo_print", "text_print"] and stored.max_attributes == 1
    rows = [caption_row(stored, index) for index in range(SPEC["num_rows"])]
    assert {r.edit_type for r in rows} == {"logo_print", "text_print"}
    assert all(
        sum(bool(r.output_slots[s]) for s in ("color", "material", "style")) <= 1 for r in rows
    )
