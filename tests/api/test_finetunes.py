"""POST/GET /v1/finetunes against a real Redis, with no worker consuming the train queue."""

from __future__ import annotations

import json

import pytest
import redis

from services.common.datasets import DatasetSpec, RunStatus, RunStore, export_prefix
from services.common.finetunes import FinetuneStatus, FinetuneStore
from services.common.queues import FINETUNE_TASK, TRAIN_QUEUE
from tests.api.conftest import keyed_client

TINY = {"max_steps": 4, "batch_size": 2, "checkpoint_every": 2, "validation_every": 0}


def make_dataset(app, owner: str, status: RunStatus = RunStatus.succeeded, seed: int = 0) -> str:
    runs = RunStore(app.state.redis, 3600)
    run, _ = runs.create_or_resume(DatasetSpec(num_rows=2, seed=seed), owner)
    if status != RunStatus.queued:
        runs.transition(
            run.id,
            {RunStatus.queued},
            status=status,
            export_prefix=export_prefix(run.id) if status == RunStatus.succeeded else None,
        )
    return run.id


@pytest.fixture
def train_queue(settings):
    r = redis.Redis.from_url(settings.redis_url)
    return lambda: [json.loads(m) for m in r.lrange(TRAIN_QUEUE, 0, -1)]


def post(client, dataset: str, **extra):
    return client.post("/v1/finetunes", json={"dataset": dataset, "config": TINY, **extra})


def test_post_queues_one_task_and_get_shows_it(client, train_queue):
    dataset = make_dataset(client.app, client.key_id)
    reply = post(client, dataset)
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert reply.headers["Location"] == f"/v1/finetunes/{body['id']}"
    assert body["status"] == "queued"
    assert body["progress"] == {
        "step": 0,
        "total": 4,
        "loss": None,
        "eta_s": None,
        "images_per_s": None,
    }
    assert body["adapter"] is None and body["validation_urls"] == []
    assert "owner" not in body and "validation_keys" not in body
    messages = train_queue()
    assert len(messages) == 1
    assert messages[0]["headers"]["task"] == FINETUNE_TASK
    assert messages[0]["headers"]["argsrepr"] == repr([body["id"], 0])

    # The same request again: the same fine-tune, nothing queued again.
    again = post(client, dataset)
    assert again.status_code == 202 and again.json()["id"] == body["id"]
    assert len(train_queue()) == 1

    got = client.get(f"/v1/finetunes/{body['id']}")
    assert got.status_code == 200 and got.json()["request"]["dataset"] == dataset


def test_canceled_finetune_is_resumed_as_a_new_generation(client, train_queue):
    dataset = make_dataset(client.app, client.key_id)
    first = post(client, dataset).json()
    assert client.post(f"/v1/finetunes/{first['id']}/cancel").json()["status"] == "canceled"
    resumed = post(client, dataset)
    assert resumed.status_code == 202
    assert resumed.json()["id"] == first["id"]
    assert resumed.json()["generation"] == 1 and resumed.json()["status"] == "queued"
    assert sorted(m["headers"]["argsrepr"] for m in train_queue()) == [
        repr([first["id"], 0]),
        repr([first["id"], 1]),
    ]


def test_unknown_dataset_is_refused(client, train_queue):
    reply = post(client, "0" * 20)
    assert reply.status_code == 422
    assert reply.json()["error"]["code"] == "invalid_dataset"
    assert train_queue() == []


def test_malformed_dataset_id_is_refused(client):
    reply = post(client, "../../etc")
    assert reply.status_code == 422
    assert "dataset" in reply.json()["error"]["message"]


def test_another_keys_dataset_is_refused(client, train_queue):
    other = keyed_client(client.app)
    dataset = make_dataset(client.app, other.key_id)
    reply = post(client, dataset)
    assert reply.status_code == 422
    assert reply.json()["error"]["code"] == "invalid_dataset"
    assert train_queue() == []


@pytest.mark.parametrize("status", [RunStatus.queued, RunStatus.running, RunStatus.failed])
def test_dataset_not_succeeded_is_refused(client, status):
    dataset = make_dataset(client.app, client.key_id, status)
    reply = post(client, dataset)
    assert reply.status_code == 422
    assert reply.json()["error"]["code"] == "invalid_dataset"
    assert str(status) in reply.json()["error"]["message"]


def test_base_model_must_be_allowed(client, settings, train_queue):
    dataset = make_dataset(client.app, client.key_id)
    reply = post(client, dataset, base_model="/etc/secret-model")
    assert reply.status_code == 422
    assert reply.json()["error"]["code"] == "invalid_base_model"
    assert "/etc" not in reply.json()["error"]["message"]
    assert train_queue() == []


def test_allowed_base_model_is_accepted(settings, train_queue):
    from services.api.main import create_app

    app = create_app(settings.model_copy(update={"finetune_base_models": ("org/ip2p-b",)}))
    with keyed_client(app) as client:
        dataset = make_dataset(app, client.key_id)
        reply = post(client, dataset, base_model="org/ip2p-b")
        assert reply.status_code == 202, reply.text
        assert reply.json()["request"]["base_model"] == "org/ip2p-b"


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"max_steps": 0}, "max_steps"),
        ({"rank": 1000}, "rank"),
        ({"learning_rate": -1}, "learning_rate"),
        ({"resolution": 65}, "resolution"),
        ({"no_such_option": 1}, "no_such_option"),
        ({"mode": "full"}, "config"),
    ],
)
def test_bad_hyper_parameters_name_the_field(client, config, field, train_queue):
    dataset = make_dataset(client.app, client.key_id)
    reply = client.post("/v1/finetunes", json={"dataset": dataset, "config": config})
    assert reply.status_code == 422
    error = reply.json()["error"]
    assert field in error["code"] or field in error["message"], error
    assert train_queue() == []


def test_ownership_get_cancel_list(client):
    other = keyed_client(client.app)
    mine = post(client, make_dataset(client.app, client.key_id)).json()
    theirs = post(other, make_dataset(client.app, other.key_id, seed=1)).json()

    for path in (f"/v1/finetunes/{theirs['id']}", f"/v1/finetunes/{theirs['id']}/validation/0"):
        reply = client.get(path)
        assert reply.status_code == 404
        assert reply.json()["error"]["code"] == "finetune_not_found"
    assert client.post(f"/v1/finetunes/{theirs['id']}/cancel").status_code == 404
    assert other.get(f"/v1/finetunes/{theirs['id']}").json()["status"] == "queued"

    listed = client.get("/v1/finetunes").json()
    assert [f["id"] for f in listed["data"]] == [mine["id"]]
    assert [f["id"] for f in other.get("/v1/finetunes").json()["data"]] == [theirs["id"]]


def test_list_is_newest_first_with_a_cursor(client):
    ids = [
        post(client, make_dataset(client.app, client.key_id, seed=s)).json()["id"] for s in range(3)
    ]
    first = client.get("/v1/finetunes", params={"limit": 2}).json()
    assert [f["id"] for f in first["data"]] == ids[::-1][:2]
    rest = client.get("/v1/finetunes", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [f["id"] for f in rest["data"]] == ids[:1] and rest["next_cursor"] is None
    assert client.get("/v1/finetunes", params={"cursor": "nope"}).status_code == 422


def test_cancel_twice_is_200_and_finished_is_409(client):
    finetune = post(client, make_dataset(client.app, client.key_id)).json()
    path = f"/v1/finetunes/{finetune['id']}/cancel"
    assert client.post(path).json()["status"] == "canceled"
    again = client.post(path)
    assert again.status_code == 200 and again.json()["status"] == "canceled"

    done = post(client, make_dataset(client.app, client.key_id, seed=7)).json()
    store = FinetuneStore(client.app.state.redis, 3600)
    store.transition(done["id"], {FinetuneStatus.queued}, status=FinetuneStatus.succeeded)
    reply = client.post(f"/v1/finetunes/{done['id']}/cancel")
    assert reply.status_code == 409
    assert reply.json()["error"]["code"] == "finetune_finished"


def test_validation_renders_are_served_with_signed_urls(client, settings):
    from services.common.storage import open_storage

    finetune = post(client, make_dataset(client.app, client.key_id)).json()
    key = f"finetunes/{finetune['id']}/validation/step-2/000.png"
    open_storage(settings).put(key, b"\x89PNG fake", "image/png")
    store = FinetuneStore(client.app.state.redis, 3600)
    store.transition(
        finetune["id"], {FinetuneStatus.queued}, validation_keys=[key], validation_step=2
    )
    body = client.get(f"/v1/finetunes/{finetune['id']}").json()
    assert body["validation_step"] == 2
    (url,) = body["validation_urls"]
    path = url.removeprefix(settings.public_base_url.rstrip("/"))
    assert path.startswith(f"/v1/finetunes/{finetune['id']}/validation/0?")
    anonymous = client.get(path, headers={"Authorization": ""})
    assert anonymous.status_code == 200 and anonymous.content == b"\x89PNG fake"
    unsigned = client.get(
        f"/v1/finetunes/{finetune['id']}/validation/0", headers={"Authorization": ""}
    )
    assert unsigned.status_code == 401


def test_requests_are_rate_limited(settings):
    from services.api.main import create_app

    app = create_app(settings.model_copy(update={"rate_limit": "2/minute"}))
    with keyed_client(app) as client:
        codes = [
            post(client, make_dataset(app, client.key_id, seed=s)).status_code for s in range(3)
        ]
    assert codes == [202, 202, 429]
