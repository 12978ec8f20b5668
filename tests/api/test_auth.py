"""Who may do what: every /v1 route needs an API key, a job is visible to its own key
only, revocation works at once, and output URLs are signed and short-lived."""

import json
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from fastapi.testclient import TestClient

from services.api.main import create_app
from services.common.api_keys import LOCAL_KEY_ID, KeyStore
from services.common.jobs import output_key
from tests.api.conftest import create_key, keyed_client
from tests.api.test_edits import submit
from tests.common.test_api_keys import every_name_and_value
from tests.conftest import image_bytes

PNG = image_bytes()
MISSING = uuid.uuid4().hex


def _assert_unauthorized(response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"
    assert set(response.json()) == {"error"}
    assert set(response.json()["error"]) == {"code", "message"}
    assert response.headers["www-authenticate"].startswith("Bearer")


def _unkeyed(client) -> TestClient:
    return TestClient(client.app)


def _other(client) -> TestClient:
    """A client of the same app with a key of its own."""
    return keyed_client(client.app)


def _succeeded(client, storage_data=PNG, outputs=1) -> tuple[str, list[str]]:
    job_id = submit(client).json()["id"]
    jobs = client.app.state.jobs
    claimed = jobs.claim(job_id, timedelta(seconds=60)).job
    keys = [output_key(job_id, i, claimed.lease_owner) for i in range(outputs)]
    for key in keys:
        client.app.state.storage.put(key, storage_data, "image/png")
    jobs.succeed(claimed, keys)
    return job_id, keys


def _local_path(url: str) -> str:
    """An absolute output URL as a path and query the TestClient can GET."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


# -- no key -------------------------------------------------------------------------


def _routes(job_id: str):
    return [
        ("GET", "/v1/edits", {}),
        ("GET", f"/v1/edits/{job_id}", {}),
        ("POST", "/v1/edits", {"files": {"image": ("a.png", PNG, "image/png")}}),
        ("POST", f"/v1/edits/{job_id}/cancel", {}),
        ("DELETE", f"/v1/edits/{job_id}", {}),
        ("GET", f"/v1/edits/{job_id}/events", {}),
        ("GET", f"/v1/edits/{job_id}/outputs/0", {}),
        ("GET", "/v1/datasets", {}),
        ("GET", f"/v1/datasets/{job_id}", {}),
        ("POST", f"/v1/datasets/{job_id}/cancel", {}),
    ]


@pytest.mark.parametrize("index", range(len(_routes("x"))))
def test_every_route_needs_a_key(client, index):
    job_id = submit(client).json()["id"]
    method, path, kwargs = _routes(job_id)[index]
    if method == "POST" and path == "/v1/edits":
        kwargs = {**kwargs, "data": {"prompt": "make it red"}}
    response = _unkeyed(client).request(method, path, **kwargs)
    _assert_unauthorized(response)
    # ...and it did nothing: the job is still there and still queued, nothing new.
    assert client.get(f"/v1/edits/{job_id}").json()["status"] == "queued"
    assert [j["id"] for j in client.get("/v1/edits").json()["data"]] == [job_id]


def test_a_missing_job_without_a_key_is_401_not_404(client):
    _assert_unauthorized(_unkeyed(client).get(f"/v1/edits/{MISSING}"))


def test_a_post_without_key_and_without_body_is_401(client):
    _assert_unauthorized(_unkeyed(client).post("/v1/edits"))
    _assert_unauthorized(_unkeyed(client).post("/v1/datasets", json={}))


# -- bad keys -----------------------------------------------------------------------


def _bad_keys(good: str) -> list[str]:
    prefix, key_id, secret = good.split("_", 2)
    return [
        "nonsense",
        "ie_",
        f"{prefix}_{key_id}",  # no secret
        f"ie_{'0' * 12}_{secret}",  # unknown id
        f"{prefix}_{key_id}_{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}",  # wrong secret
        f"{prefix}_{key_id}_{secret}x",
        f"sk_{key_id}_{secret}",
    ]


@pytest.mark.parametrize("index", range(7))
@pytest.mark.parametrize("how", ["bearer", "x-api-key"])
def test_bad_keys_are_401(client, index, how):
    good = client.headers["Authorization"].removeprefix("Bearer ")
    bad = _bad_keys(good)[index]
    headers = {"Authorization": f"Bearer {bad}"} if how == "bearer" else {"X-API-Key": bad}
    _assert_unauthorized(_unkeyed(client).get("/v1/edits", headers=headers))
    _assert_unauthorized(
        _unkeyed(client).post(
            "/v1/edits",
            headers=headers,
            files={"image": ("a.png", PNG, "image/png")},
            data={"prompt": "x"},
        )
    )
    assert client.app.state.jobs.unfinished_count() == 0


def test_x_api_key_works_like_bearer(client):
    key = client.headers["Authorization"].removeprefix("Bearer ")
    plain = _unkeyed(client)
    plain.headers["X-API-Key"] = key
    response = submit(plain)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    # The same owner either way.
    assert client.get(f"/v1/edits/{job_id}").status_code == 200
    assert [j["id"] for j in plain.get("/v1/edits").json()["data"]] == [job_id]
    assert client.app.state.jobs.get(job_id).owner == client.key_id


def test_a_bad_bearer_is_not_rescued_by_a_good_x_api_key(client):
    """Two keys, one bad: refused (a request acts for one key, and a bad one is 401)."""
    key = client.headers["Authorization"].removeprefix("Bearer ")
    response = _unkeyed(client).get(
        "/v1/edits", headers={"Authorization": "Bearer ie_000000000000_nope", "X-API-Key": key}
    )
    _assert_unauthorized(response)


# -- isolation between keys ---------------------------------------------------------


def _same_shape_as_missing(response, other_response, job_id) -> None:
    assert response.status_code == other_response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"
    body = json.loads(response.text.replace(job_id, MISSING))
    assert body == other_response.json()


@pytest.mark.parametrize(
    "method,suffix",
    [
        ("GET", ""),
        ("GET", "/outputs/0"),
        ("GET", "/events"),
        ("POST", "/cancel"),
        ("DELETE", ""),
    ],
)
def test_another_keys_job_reads_as_missing(client, method, suffix):
    job_id = submit(client).json()["id"]
    other = _other(client)
    theirs = other.request(method, f"/v1/edits/{job_id}{suffix}")
    missing = other.request(method, f"/v1/edits/{MISSING}{suffix}")
    _same_shape_as_missing(theirs, missing, job_id)
    # The owner's job is untouched.
    job = client.get(f"/v1/edits/{job_id}").json()
    assert job["status"] == "queued"
    assert client.app.state.storage.exists(f"edits/{job_id}/input")


def test_another_keys_succeeded_output_is_404_without_a_signature(client):
    job_id, _ = _succeeded(client)
    other = _other(client)
    theirs = other.get(f"/v1/edits/{job_id}/outputs/0")
    missing = other.get(f"/v1/edits/{MISSING}/outputs/0")
    _same_shape_as_missing(theirs, missing, job_id)
    # ...as is deleting or canceling it.
    assert other.delete(f"/v1/edits/{job_id}").status_code == 404
    assert other.post(f"/v1/edits/{job_id}/cancel").status_code == 404
    assert client.get(f"/v1/edits/{job_id}/outputs/0").status_code == 200


def test_listings_show_own_jobs_only(client):
    other = _other(client)
    mine = submit(client).json()["id"]
    theirs = submit(other).json()["id"]
    assert [j["id"] for j in client.get("/v1/edits").json()["data"]] == [mine]
    assert [j["id"] for j in other.get("/v1/edits").json()["data"]] == [theirs]
    for status in ("queued", "canceled"):
        listed = other.get("/v1/edits", params={"status": status}).json()["data"]
        assert mine not in [j["id"] for j in listed]


def test_all_of_another_keys_attempts_leave_the_job_untouched(client):
    job_id = submit(client).json()["id"]
    before = client.app.state.jobs.get(job_id)
    other = _other(client)
    for method, suffix in [
        ("GET", ""),
        ("GET", "/outputs/0"),
        ("GET", "/events"),
        ("POST", "/cancel"),
        ("DELETE", ""),
    ]:
        assert other.request(method, f"/v1/edits/{job_id}{suffix}").status_code == 404
    assert job_id not in [j["id"] for j in other.get("/v1/edits").json()["data"]]
    assert client.app.state.jobs.get(job_id) == before
    assert [j["id"] for j in client.get("/v1/edits").json()["data"]] == [job_id]
    assert client.get(f"/v1/edits/{job_id}").json()["status"] == "queued"


# -- revocation ---------------------------------------------------------------------


def test_revoked_key_stops_working_at_once(client):
    job_id = submit(client).json()["id"]
    assert client.get(f"/v1/edits/{job_id}").status_code == 200
    KeyStore(client.app.state.redis).revoke(client.key_id)
    _assert_unauthorized(client.get(f"/v1/edits/{job_id}"))
    _assert_unauthorized(client.get("/v1/edits"))
    _assert_unauthorized(submit(client))


def _cli(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "INSTRUCTEDIT_REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "services.api", "keys", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_revoking_with_the_cli_stops_the_key_at_once(client, settings):
    assert client.get("/v1/edits").status_code == 200
    done = _cli(settings.redis_url, "revoke", client.key_id)
    assert done.returncode == 0, done.stderr
    revoked = json.loads(done.stdout)
    assert revoked["id"] == client.key_id and revoked["revoked_at"] is not None
    _assert_unauthorized(client.get("/v1/edits"))


def test_cli_creates_lists_and_revokes_keys(settings):
    created = _cli(settings.redis_url, "create", "--name", "x")
    assert created.returncode == 0, created.stderr
    lines = created.stdout.strip().splitlines()
    assert len(lines) == 1
    key = json.loads(lines[0])
    assert set(key) == {"id", "name", "key", "webhook_secret"}
    assert key["name"] == "x"
    assert key["key"].startswith("ie_") and key["key"].split("_")[1] == key["id"]
    assert key["webhook_secret"].startswith("whsec_")

    r = redis.Redis.from_url(settings.redis_url)
    assert not any(key["key"].encode() in value for value in every_name_and_value(r))
    assert not any(
        key["key"].split("_", 2)[2].encode() in value for value in every_name_and_value(r)
    )

    # The key the CLI made works with the API on the same Redis.
    with TestClient(create_app(settings)) as api:
        api.headers["Authorization"] = f"Bearer {key['key']}"
        assert api.get("/v1/edits").status_code == 200

        listed = _cli(settings.redis_url, "list")
        assert listed.returncode == 0, listed.stderr
        (entry,) = [json.loads(line) for line in listed.stdout.strip().splitlines()]
        assert entry["id"] == key["id"] and entry["name"] == "x" and entry["active"] is True
        assert key["key"] not in listed.stdout and key["webhook_secret"] not in listed.stdout
        assert "digest" not in listed.stdout

        revoked = _cli(settings.redis_url, "revoke", key["id"])
        assert revoked.returncode == 0, revoked.stderr
        _assert_unauthorized(api.get("/v1/edits"))
    listed = _cli(settings.redis_url, "list")
    (entry,) = [json.loads(line) for line in listed.stdout.strip().splitlines()]
    assert entry["active"] is False and entry["revoked_at"] is not None


def test_cli_revoking_an_unknown_key_fails(settings):
    done = _cli(settings.redis_url, "revoke", "0123456789ab")
    assert done.returncode == 1
    assert "0123456789ab" in done.stderr
    assert done.stdout == ""


def test_cli_refuses_a_blank_name(settings):
    done = _cli(settings.redis_url, "create", "--name", "  ")
    assert done.returncode != 0
    assert KeyStore(redis.Redis.from_url(settings.redis_url)).list() == []


# -- auth disabled ------------------------------------------------------------------


def test_auth_disabled_acts_as_the_local_caller(settings):
    local = settings.model_copy(update={"auth": "disabled"})
    with TestClient(create_app(local)) as plain:
        response = submit(plain)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert plain.get(f"/v1/edits/{job_id}").status_code == 200
        assert [j["id"] for j in plain.get("/v1/edits").json()["data"]] == [job_id]
        assert plain.app.state.jobs.get(job_id).owner == LOCAL_KEY_ID
        assert plain.get("/v1/datasets").status_code == 200


# -- output URLs --------------------------------------------------------------------


def test_output_url_is_signed_and_downloads_without_a_key(client):
    job_id, _ = _succeeded(client)
    (output,) = client.get(f"/v1/edits/{job_id}").json()["outputs"]
    query = parse_qs(urlsplit(output["url"]).query)
    assert set(query) == {"expires", "signature"}
    assert int(query["expires"][0]) > 0 and re.fullmatch(r"[0-9a-f]{64}", query["signature"][0])

    download = _unkeyed(client).get(_local_path(output["url"]))
    assert download.status_code == 200, download.text
    assert download.content == PNG
    assert download.headers["content-type"] == "image/png"
    # Anyone holding the URL may use it, another key too.
    assert _other(client).get(_local_path(output["url"])).content == PNG


def test_tampered_output_url_is_401(client):
    job_id, _ = _succeeded(client, outputs=2)
    url = client.get(f"/v1/edits/{job_id}").json()["outputs"][0]["url"]
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    expires, signature = query["expires"][0], query["signature"][0]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    plain = _unkeyed(client)
    for path in [
        f"{parts.path}?expires={expires}&signature={flipped}",
        f"{parts.path}?expires={int(expires) + 3600}&signature={signature}",
        # The signature of output 0 does not open output 1.
        f"/v1/edits/{job_id}/outputs/1?expires={expires}&signature={signature}",
        f"{parts.path}?expires={expires}",
        f"{parts.path}?signature={signature}",
    ]:
        _assert_unauthorized(plain.get(path))


def test_expired_output_url_is_401(client):
    job_id, _ = _succeeded(client)
    # Signed by the API itself, but for a moment that has passed.
    path = client.app.state.url_signer.sign(f"/v1/edits/{job_id}/outputs/0", -5)
    _assert_unauthorized(_unkeyed(client).get(path))
    # The owner's key still opens it.
    assert client.get(path).status_code == 200


def test_output_url_expires_after_the_configured_time(settings):
    short = settings.model_copy(update={"presigned_url_expiry_s": 1})

    with keyed_client(create_app(short)) as owner:
        job_id, _ = _succeeded(owner)
        url = owner.get(f"/v1/edits/{job_id}").json()["outputs"][0]["url"]
        expires = int(parse_qs(urlsplit(url).query)["expires"][0])
        assert expires - time.time() <= 1.5
        time.sleep(max(expires - time.time(), 0) + 1.1)
        _assert_unauthorized(TestClient(owner.app).get(_local_path(url)))


def test_signed_url_of_a_deleted_job_is_404(client):
    job_id, _ = _succeeded(client)
    url = client.get(f"/v1/edits/{job_id}").json()["outputs"][0]["url"]
    assert client.delete(f"/v1/edits/{job_id}").status_code == 204
    response = _unkeyed(client).get(_local_path(url))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"


# -- storage keys -------------------------------------------------------------------


def test_storage_keys_carry_the_random_job_id(client, stored):
    first = submit(client).json()["id"]
    second = submit(client).json()["id"]
    for job_id in (first, second):
        assert re.fullmatch(r"[0-9a-f]{32}", job_id)
        assert client.app.state.jobs.get(job_id).input_key == f"edits/{job_id}/input"
    assert first != second
    assert stored() == sorted([f"edits/{first}/input", f"edits/{second}/input"])


def test_a_fresh_key_sees_nothing(client):
    submit(client)
    fresh = keyed_client(client.app)
    assert fresh.get("/v1/edits").json() == {"data": [], "next_cursor": None}
    assert create_key(client.app, "x").id != client.key_id
