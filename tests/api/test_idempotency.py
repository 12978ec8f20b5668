"""`Idempotency-Key` on POST /v1/edits: a retried submission returns the job the first one
created, never a second job, also when the duplicates arrive at once."""

import concurrent.futures
import json

import httpx
import pytest
import redis

import services.api.idempotency as idempotency
from services.common.api_keys import KeyStore
from tests.api.conftest import keyed_client
from tests.api.test_upload_limit import serve
from tests.conftest import image_bytes

PNG = image_bytes()
OTHER_PNG = image_bytes(color=(10, 200, 10))


def post(client, key="retry-1", image=PNG, mask=None, **fields):
    fields.setdefault("prompt", "make it red")
    files = {"image": ("a.png", image, "image/png")}
    if mask is not None:
        files["mask"] = ("m.png", mask, "image/png")
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post(
        "/v1/edits", files=files, data={k: str(v) for k, v in fields.items()}, headers=headers
    )


def _records(settings) -> list[bytes]:
    return redis.Redis.from_url(settings.redis_url).keys("instructedit:job:*")


def _only_records(settings) -> list[bytes]:
    """Job records proper (not their event streams or delivery lists)."""
    return [k for k in _records(settings) if k.count(b":") == 2]


def test_same_key_and_request_returns_the_same_job(client, settings, queue_len, stored):
    first = post(client, seed=3)
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    second = post(client, seed=3)
    assert second.status_code == 200, second.text
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["location"] == f"/v1/edits/{first.json()['id']}"
    assert second.json()["params"] == first.json()["params"]
    assert len(_only_records(settings)) == 1
    assert queue_len() == 1
    assert stored() == [f"edits/{first.json()['id']}/input"]
    assert len(client.get("/v1/edits").json()["data"]) == 1


def test_field_order_does_not_matter(client):
    files = {"image": ("a.png", PNG, "image/png")}
    headers = {"Idempotency-Key": "order"}
    first = client.post(
        "/v1/edits", files=files, data={"prompt": "p", "seed": "1"}, headers=headers
    )
    second = client.post(
        "/v1/edits", files=files, data={"seed": "1", "prompt": "p"}, headers=headers
    )
    assert first.status_code == 202 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "make it blue"},
        {"image": OTHER_PNG},
        {"seed": 4},
        {"num_outputs": 2},
        {"mask": image_bytes(mode="L")},
    ],
)
def test_same_key_with_another_request_is_422(client, settings, queue_len, change):
    first = post(client, seed=3)
    assert first.status_code == 202
    response = post(client, **{"seed": 3, **change})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "idempotency_key_reused"
    assert len(_only_records(settings)) == 1
    assert queue_len() == 1
    # The first request, retried, is still recognised.
    assert post(client, seed=3).json()["id"] == first.json()["id"]


def test_keys_of_different_api_keys_are_independent(client, settings):
    other = keyed_client(client.app)
    mine = post(client, key="same", seed=1)
    theirs = post(other, key="same", seed=1)
    assert mine.status_code == theirs.status_code == 202
    assert mine.json()["id"] != theirs.json()["id"]
    assert client.get(f"/v1/edits/{theirs.json()['id']}").status_code == 404
    # ...and a different body under the other key's Idempotency-Key is no conflict.
    assert post(other, key="mine-only", prompt="other").status_code == 202
    assert post(client, key="mine-only").status_code == 202
    assert len(_only_records(settings)) == 4


def test_different_idempotency_keys_make_different_jobs(client):
    assert post(client, key="a").json()["id"] != post(client, key="b").json()["id"]


def test_without_a_key_every_post_is_a_new_job(client, settings):
    assert (
        post(client, key=None, seed=1).json()["id"] != post(client, key=None, seed=1).json()["id"]
    )
    assert len(_only_records(settings)) == 2


def test_an_omitted_seed_is_not_part_of_the_request(client):
    first = post(client)
    second = post(client)
    assert first.status_code == 202 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    # The seed the server drew for the first is the job's; the retry does not draw another.
    assert second.json()["params"]["seed"] == first.json()["params"]["seed"]
    # Sending a seed is a different request from omitting it.
    assert post(client, seed=first.json()["params"]["seed"]).status_code == 422


def test_a_failed_first_request_does_not_hold_the_key(client, settings):
    bad = post(client, key="k", image=b"not an image")
    assert bad.status_code in (415, 422), bad.text
    assert bad.json()["error"]["code"] != "idempotency_key_reused"
    # The same failing request again fails the same way (it is not "replayed").
    assert post(client, key="k", image=b"not an image").status_code == bad.status_code
    good = post(client, key="k")
    assert good.status_code == 202, good.text
    assert post(client, key="k").json()["id"] == good.json()["id"]
    assert len(_only_records(settings)) == 1


def test_a_replay_is_not_counted_against_the_rate(settings):
    from services.api.main import create_app

    limited = settings.model_copy(update={"rate_limit": "1/minute"})
    with keyed_client(create_app(limited)) as client:
        first = post(client)
        assert first.status_code == 202
        for _ in range(3):
            again = post(client)
            assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        assert post(client, key="fresh").status_code == 429


@pytest.mark.parametrize("key", ["", "x" * 256, "bad\x7fkey"])
def test_an_invalid_idempotency_key_is_422(client, settings, key):
    response = client.post(
        "/v1/edits",
        files={"image": ("a.png", PNG, "image/png")},
        data={"prompt": "x"},
        headers={"Idempotency-Key": key},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_idempotency_key"
    assert _only_records(settings) == []


def test_retry_after_the_job_was_deleted_does_not_hang(client, monkeypatch):
    """The key's reservation names a job that is gone (DELETE): a retry must not wait for
    a job that will never appear and then claim the first request is still running."""
    monkeypatch.setattr(idempotency, "WAIT_FOR_FIRST_S", 1.0)
    first = post(client)
    job_id = first.json()["id"]
    assert client.delete(f"/v1/edits/{job_id}").status_code == 204
    retry = post(client)
    assert not (
        retry.status_code == 409 and retry.json()["error"]["code"] == "idempotency_in_progress"
    ), retry.text


def test_concurrent_duplicates_create_one_job(settings):
    with serve(settings) as port:
        r = redis.Redis.from_url(settings.redis_url)
        key = KeyStore(r).create("racer").key

        def send(_):
            return httpx.post(
                f"http://127.0.0.1:{port}/v1/edits",
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "race"},
                files={"image": ("a.png", PNG, "image/png")},
                data={"prompt": "make it red"},
                timeout=60,
            )

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(send, range(8)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 7 + [202], [r.text for r in responses]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    assert [r.headers.get("idempotent-replayed") for r in responses].count("true") == 7
    records = [k for k in r.keys("instructedit:job:*") if k.count(b":") == 2]
    assert records == [f"instructedit:job:{ids.pop()}".encode()]
    assert r.llen("edits") == 1
    assert len(json.loads(r.lindex("edits", 0))["headers"]["id"]) == 32
