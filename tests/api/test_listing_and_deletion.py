"""GET /v1/edits (own jobs, newest first, cursor pages, status filter) and DELETE
/v1/edits/{id} (the record, every index entry and every stored image go)."""

import base64
from datetime import timedelta

import boto3
import pytest
import redis

from services.api.main import create_app
from services.common.jobs import (
    JobError,
    JobErrorCode,
    JobNotFound,
    TransitionRefused,
    output_key,
)
from services.common.storage import open_storage
from tests.api.conftest import keyed_client
from tests.api.test_edits import submit
from tests.api.test_s3_outputs import s3_settings  # noqa: F401 (a fixture)
from tests.conftest import image_bytes

MASK = image_bytes(mode="L")


def _ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [job["id"] for job in response.json()["data"]]


def _submit_n(client, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        response = submit(client)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def _succeed(client, job_id: str, outputs: int = 2) -> list[str]:
    jobs, storage = client.app.state.jobs, client.app.state.storage
    claimed = jobs.claim(job_id, timedelta(seconds=60)).job
    keys = [output_key(job_id, i, claimed.lease_owner) for i in range(outputs)]
    for key in keys:
        storage.put(key, image_bytes(), "image/png")
    # A lost attempt's output: under the job's prefix, but named by no record.
    storage.put(output_key(job_id, 0, "0123456789abcdef"), b"stale")
    jobs.succeed(claimed, keys)
    return keys


def _mentions(redis_url: str, job_id: str) -> list[bytes]:
    """Keys named after the job, and indexes (sorted sets, sets) that list it."""
    r = redis.Redis.from_url(redis_url)
    found = []
    for name in r.scan_iter():
        kind = r.type(name)
        named = job_id.encode() in name
        in_zset = kind == b"zset" and r.zscore(name, job_id) is not None
        in_set = kind == b"set" and r.sismember(name, job_id)
        if named or in_zset or in_set:
            found.append(name)
    return found


# -- listing ------------------------------------------------------------------------


def test_listing_shows_own_jobs_newest_first(client):
    other = keyed_client(client.app)
    mine = _submit_n(client, 3)
    _submit_n(other, 2)
    assert _ids(client.get("/v1/edits")) == mine[::-1]
    body = client.get("/v1/edits").json()
    assert body["next_cursor"] is None
    assert all(job["status"] == "queued" for job in body["data"])
    # Each item is the job as GET /v1/edits/{id} shows it.
    first = body["data"][0]
    single = client.get(f"/v1/edits/{first['id']}").json()
    assert first == single


def test_pages_walk_every_job_exactly_once(client):
    made = _submit_n(client, 5)
    seen, cursors, pages = [], [], 0
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        response = client.get("/v1/edits", params=params)
        page = _ids(response)
        assert len(page) <= 2
        seen += page
        pages += 1
        cursor = response.json()["next_cursor"]
        if cursor is None:
            break
        cursors.append(cursor)
        assert pages < 10
    assert seen == made[::-1]
    assert pages == 3
    assert len(set(cursors)) == len(cursors)


def test_a_page_is_stable_while_new_jobs_arrive(client):
    made = _submit_n(client, 4)
    first = client.get("/v1/edits", params={"limit": 2}).json()
    newer = _submit_n(client, 2)
    rest = client.get("/v1/edits", params={"limit": 10, "cursor": first["next_cursor"]})
    assert _ids(rest) == made[::-1][2:]
    assert _ids(client.get("/v1/edits", params={"limit": 2})) == newer[::-1]


def test_status_filter(client):
    made = _submit_n(client, 5)
    for job_id in (made[1], made[3]):
        assert client.post(f"/v1/edits/{job_id}/cancel").status_code == 200
    assert _ids(client.get("/v1/edits", params={"status": "canceled"})) == [made[3], made[1]]
    queued = _ids(client.get("/v1/edits", params={"status": "queued"}))
    assert queued == [made[4], made[2], made[0]]
    assert _ids(client.get("/v1/edits", params={"status": "succeeded"})) == []
    # Filtered pages walk the matches only.
    page = client.get("/v1/edits", params={"status": "queued", "limit": 2}).json()
    assert [j["id"] for j in page["data"]] == [made[4], made[2]]
    rest = client.get(
        "/v1/edits", params={"status": "queued", "limit": 2, "cursor": page["next_cursor"]}
    )
    assert _ids(rest) == [made[0]]


def test_an_unknown_status_is_422(client):
    response = client.get("/v1/edits", params={"status": "sleeping"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_status"


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor",
        "!!!",
        _b64("nope"),
        _b64("abc|deadbeef"),
        _b64("nan|deadbeef"),
        "%%%%",
    ],
)
def test_a_bad_cursor_is_422(client, cursor):
    _submit_n(client, 1)
    response = client.get("/v1/edits", params={"cursor": cursor})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_cursor"


@pytest.mark.parametrize("limit", ["0", "101", "-1", "two"])
def test_a_limit_out_of_bounds_is_422(client, limit):
    response = client.get("/v1/edits", params={"limit": limit})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_limit"


def test_limits_at_the_bounds(client):
    _submit_n(client, 2)
    assert len(_ids(client.get("/v1/edits", params={"limit": 1}))) == 1
    assert len(_ids(client.get("/v1/edits", params={"limit": 100}))) == 2


# -- deletion -----------------------------------------------------------------------


def test_deleting_a_queued_job_removes_everything(client, settings, stored):
    keep = submit(client).json()["id"]
    response = submit(client, mask=MASK)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert stored() == sorted(
        [f"edits/{keep}/input", f"edits/{job_id}/input", f"edits/{job_id}/mask"]
    )

    deleted = client.delete(f"/v1/edits/{job_id}")
    assert deleted.status_code == 204
    assert deleted.content == b""

    gone = client.get(f"/v1/edits/{job_id}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "job_not_found"
    assert client.get(f"/v1/edits/{job_id}/events").status_code == 404
    assert stored() == [f"edits/{keep}/input"]
    assert _ids(client.get("/v1/edits")) == [keep]
    assert _ids(client.get("/v1/edits", params={"status": "canceled"})) == []
    assert _mentions(settings.redis_url, job_id) == []
    # The job left the queue's accounting too.
    assert client.app.state.jobs.unfinished_count() == 1
    assert client.get(f"/v1/edits/{keep}").json()["status"] == "queued"


def test_deleting_a_succeeded_job_removes_its_outputs(client, settings, stored):
    job_id = submit(client).json()["id"]
    _succeed(client, job_id)
    url = client.get(f"/v1/edits/{job_id}").json()["outputs"][0]["url"]
    assert client.get(f"/v1/edits/{job_id}/outputs/1").status_code == 200
    assert len(stored()) == 4

    assert client.delete(f"/v1/edits/{job_id}").status_code == 204

    assert stored() == []
    assert client.get(f"/v1/edits/{job_id}/outputs/0").status_code == 404
    path = url.split("127.0.0.1:8000", 1)[1]
    assert client.get(path).status_code == 404
    assert _mentions(settings.redis_url, job_id) == []


def test_deleting_a_failed_and_a_canceled_job(client, stored):
    canceled, failed = _submit_n(client, 2)
    client.post(f"/v1/edits/{canceled}/cancel")
    jobs = client.app.state.jobs
    jobs.fail(jobs.claim(failed, timedelta(seconds=60)).job, JobError.of(JobErrorCode.timeout))
    for job_id in (canceled, failed):
        assert client.delete(f"/v1/edits/{job_id}").status_code == 204
        assert client.get(f"/v1/edits/{job_id}").status_code == 404
    assert stored() == []


def test_deleting_a_running_job_cancels_and_removes_it(client, stored):
    job_id = submit(client).json()["id"]
    jobs = client.app.state.jobs
    claim = jobs.claim(job_id, timedelta(seconds=60)).job
    assert client.delete(f"/v1/edits/{job_id}").status_code == 204
    assert stored() == []
    # The worker that held it can no longer publish anything for it.
    with pytest.raises((JobNotFound, TransitionRefused)):
        jobs.succeed(claim, [output_key(job_id, 0, claim.lease_owner)])
    assert client.get(f"/v1/edits/{job_id}").status_code == 404


def test_deleting_twice_is_404(client):
    job_id = submit(client).json()["id"]
    assert client.delete(f"/v1/edits/{job_id}").status_code == 204
    again = client.delete(f"/v1/edits/{job_id}")
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "job_not_found"


def test_deleting_frees_the_idempotency_of_nothing_else(client):
    a, b = _submit_n(client, 2)
    assert client.delete(f"/v1/edits/{a}").status_code == 204
    assert _ids(client.get("/v1/edits")) == [b]
    assert client.app.state.storage.exists(f"edits/{b}/input")


def test_deleting_a_succeeded_job_on_s3_removes_its_objects(s3_settings):  # noqa: F811
    with keyed_client(create_app(s3_settings)) as client:
        keep = submit(client).json()["id"]
        job_id = submit(client, mask=MASK).json()["id"]
        _succeed(client, job_id)
        storage = open_storage(s3_settings)
        assert len(storage.list(f"edits/{job_id}/")) == 5  # input, mask, 2 outputs, stale
        assert client.delete(f"/v1/edits/{job_id}").status_code == 204
        assert storage.list(f"edits/{job_id}/") == []
        assert client.get(f"/v1/edits/{job_id}").status_code == 404
    bucket = s3_settings.storage_url.removeprefix("s3://").split("/", 1)[0]
    s3 = boto3.client("s3", endpoint_url=s3_settings.s3_endpoint_url, region_name="us-east-1")
    listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [obj["Key"] for obj in listed] == [f"instructedit/edits/{keep}/input"]
