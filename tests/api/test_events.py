"""A job's progress as it happens: the event stream, queue positions and `?wait=`, against
a real Redis, with the worker's side played through JobStore (the same operations the
worker runs)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import redis
from httpx_sse import connect_sse

from services.common.job_events import estimated_wait_s, stream_id
from services.common.jobs import JobStore, Progress, ProgressReport
from tests.api.test_edits import submit

LEASE = timedelta(seconds=30)


def when_watched(r: redis.Redis, then: Callable[[], None], timeout: float = 10) -> threading.Thread:
    """Run `then` in a thread once a client of this database blocks reading a stream (the
    API waits)."""
    db = str(r.connection_pool.connection_kwargs.get("db", 0))

    def blocked(c: dict) -> bool:
        return c.get("db") == db and c.get("cmd") == "xread" and "b" in c.get("flags", "")

    def run() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(blocked(c) for c in r.client_list()):
                break
            time.sleep(0.01)
        then()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def events_of(client, job_id: str, **headers: str) -> list:
    with connect_sse(client, "GET", f"/v1/edits/{job_id}/events", headers=headers) as source:
        assert source.response.status_code == 200, source.response.read()
        return list(source.iter_sse())


def work(store: JobStore, job_id: str, steps: int, finish: bool = True) -> Callable[[], None]:
    """The worker's side: claim, report steps 1 to `steps`, succeed."""

    def run() -> None:
        claim = store.claim(job_id, LEASE).job
        total = claim.progress.total
        for step in range(1, steps + 1):
            report = ProgressReport(claim, Progress(step=step, total=total))
            (claim,) = store.report_progress_many([report], LEASE)
        if finish:
            store.succeed(claim, [])

    return run


@pytest.fixture
def store(client) -> JobStore:
    return client.app.state.jobs


@pytest.fixture
def r(settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url)


def test_unknown_job_events_are_404(client):
    response = client.get("/v1/edits/doesnotexist/events")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"


def test_stream_follows_a_job_from_queued_to_completed(client, store, r):
    job = submit(client, num_inference_steps=3).json()
    worker = when_watched(r, work(store, job["id"], 3))
    events = events_of(client, job["id"])
    worker.join()

    names = [e.event for e in events]
    assert names == [
        "status",
        "queue_position",
        "status",
        "progress",
        "progress",
        "progress",
        "completed",
    ], names
    assert json.loads(events[0].data) == {"status": "queued", "progress": {"step": 0, "total": 3}}
    assert json.loads(events[1].data) == {"queue_position": 1, "estimated_wait_s": None}
    assert json.loads(events[2].data)["status"] == "running"
    assert [json.loads(e.data)["step"] for e in events[3:6]] == [1, 2, 3]
    final = json.loads(events[-1].data)
    assert final == client.get(f"/v1/edits/{job['id']}").json()
    assert final["status"] == "succeeded" and final["queue_position"] is None
    # Every change has an id, strictly increasing; the derived queue position has none,
    # nor has the state the job was created in (no change yet: nothing to resume from).
    assert events[0].id == events[1].id == ""  # (httpx-sse repeats the last id seen)
    ids = [stream_id(e.id) for e in events[2:] if e.event != "queue_position"]
    assert all(ids) and ids == sorted(ids) and len(set(ids)) == len(ids)


def test_canceled_job_stream_ends_with_canceled_and_a_reconnect_gets_204(client):
    job = submit(client).json()
    client.post(f"/v1/edits/{job['id']}/cancel")
    (event,) = events_of(client, job["id"])
    assert event.event == "canceled"
    assert json.loads(event.data) == client.get(f"/v1/edits/{job['id']}").json()
    # A client that saw the end and reconnects (EventSource does) is told to stop.
    again = client.get(f"/v1/edits/{job['id']}/events", headers={"Last-Event-ID": event.id})
    assert again.status_code == 204
    # One that did not see it gets it.
    (old,) = events_of(client, job["id"], **{"Last-Event-ID": "1-0"})
    assert old.event == "canceled"


def test_reconnect_gets_the_current_state_once_and_never_stale_progress(client, store, r):
    job = submit(client, num_inference_steps=5).json()
    work(store, job["id"], 3, finish=False)()  # running, at step 3 of 5
    entries = r.xrange(store.events_key(job["id"]))
    first_progress = entries[1][0].decode()  # running, step 1, ...
    latest = entries[-1][0].decode()

    # Missed steps 2 and 3: the current state, not the steps in between.
    claim = store.get(job["id"])
    finish = when_watched(r, lambda: store.succeed(claim, []))
    events = events_of(client, job["id"], **{"Last-Event-ID": first_progress})
    finish.join()
    assert [e.event for e in events] == ["status", "completed"]
    assert json.loads(events[0].data) == {"status": "running", "progress": {"step": 3, "total": 5}}
    assert events[0].id == latest
    assert stream_id(events[1].id) > stream_id(latest)


def test_reconnect_when_up_to_date_sends_only_what_follows(client, store, r):
    job = submit(client, num_inference_steps=5).json()
    work(store, job["id"], 2, finish=False)()
    latest = r.xrevrange(store.events_key(job["id"]), count=1)[0][0].decode()

    def more() -> None:
        claim = store.get(job["id"])
        report = ProgressReport(claim, Progress(step=3, total=5))
        (claim,) = store.report_progress_many([report], LEASE)
        store.succeed(claim, [])

    worker = when_watched(r, more)
    events = events_of(client, job["id"], **{"Last-Event-ID": latest})
    worker.join()
    assert [e.event for e in events] == ["progress", "completed"]
    assert json.loads(events[0].data) == {"step": 3, "total": 5}
    assert stream_id(events[0].id) > stream_id(latest)


def test_lease_renewals_are_no_events(client, store, r):
    job = submit(client).json()
    claim = store.claim(job["id"], LEASE).job
    before = r.xlen(store.events_key(job["id"]))
    store.renew_lease(claim, LEASE)
    (claim,) = store.report_progress_many([ProgressReport(claim, renew=True)], LEASE)
    assert r.xlen(store.events_key(job["id"])) == before


def test_queue_position_counts_the_jobs_submitted_before(client, store):
    ids = [submit(client).json()["id"] for _ in range(3)]
    positions = [client.get(f"/v1/edits/{i}").json()["queue_position"] for i in ids]
    assert positions == [1, 2, 3]
    # Any batch key: a job of another size queued earlier counts too.
    other = submit(client, num_inference_steps=7).json()
    assert other["queue_position"] == 4
    client.post(f"/v1/edits/{ids[0]}/cancel")
    assert client.get(f"/v1/edits/{ids[2]}").json()["queue_position"] == 2
    store.claim(ids[1], LEASE)
    running = client.get(f"/v1/edits/{ids[1]}").json()
    assert running["queue_position"] is None and running["estimated_wait_s"] is None
    third = client.get(f"/v1/edits/{ids[2]}").json()
    assert third["queue_position"] == 1
    assert third["estimated_wait_s"] is None  # no job finished yet: unknown
    store.succeed(store.get(ids[1]), [])
    third = client.get(f"/v1/edits/{ids[2]}").json()
    assert third["queue_position"] == 1 and third["estimated_wait_s"] is not None


def test_queue_position_events_count_down(client, store, r):
    ids = [submit(client).json()["id"] for _ in range(3)]

    def dequeue() -> None:
        client.post(f"/v1/edits/{ids[0]}/cancel")
        time.sleep(0.3)
        store.claim(ids[1], LEASE)
        time.sleep(0.3)
        client.post(f"/v1/edits/{ids[2]}/cancel")

    worker = when_watched(r, dequeue)
    events = events_of(client, ids[2])
    worker.join()
    moves = [json.loads(e.data) for e in events if e.event == "queue_position"]
    positions = [move["queue_position"] for move in moves]
    # One event per move (two moves read together would make one).
    assert positions[0] == 3 and positions[-1] < 3
    assert positions == sorted(set(positions), reverse=True)
    assert events[-1].event == "canceled"


def test_estimated_wait_uses_the_pace_of_recent_successes():
    assert estimated_wait_s(3, []) is None
    # One job alone took 4 s; then three finished 1 s apart (two workers, or a batch).
    finishes = [b"100.0 4.0", b"101.0 4.0", b"102.0 4.0", b"103.0 4.0"]
    assert estimated_wait_s(2, finishes) == pytest.approx(2 * (4 + 1 + 1 + 1) / 4)
    # A long idle gap counts no more than the job took.
    assert estimated_wait_s(1, [b"100.0 2.0", b"900.0 2.0"]) == 2.0


@pytest.mark.parametrize("wait", ["0", "-1", "61", "soon"])
def test_wait_out_of_bounds_is_422(client, wait, job_keys):
    response = client.post(
        f"/v1/edits?wait={wait}",
        files={"image": ("a.png", image_png(), "image/png")},
        data={"prompt": "make it red"},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_wait"
    assert job_keys() == []


def image_png() -> bytes:
    from tests.conftest import image_bytes

    return image_bytes()


def test_wait_returns_202_with_the_job_as_it_stands_after_the_wait(client):
    started = time.monotonic()
    response = submit_waiting(client, 0.5)
    assert response.status_code == 202
    assert response.json()["status"] == "queued"
    assert response.headers["location"] == f"/v1/edits/{response.json()['id']}"
    assert 0.5 <= time.monotonic() - started < 5


def test_wait_returns_200_once_the_job_finished(client, store, r, settings):
    # The worker starts once the API waits for the job; its id is the newest record.
    def worker() -> None:
        (key,) = r.keys("instructedit:job:*")
        work(store, key.decode().rsplit(":", 1)[1], 2)()

    thread = when_watched(r, worker)
    started = time.monotonic()
    response = submit_waiting(client, 30)
    thread.join()
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    assert response.json()["progress"] == {"step": 2, "total": 2}
    assert time.monotonic() - started < 10


def submit_waiting(client, wait: float):
    return client.post(
        f"/v1/edits?wait={wait}",
        files={"image": ("a.png", image_png(), "image/png")},
        data={"prompt": "make it red", "num_inference_steps": "2"},
    )


def test_openapi_documents_events_and_queue_fields(client):
    schema = client.get("/openapi.json").json()
    assert (
        "text/event-stream"
        in schema["paths"]["/v1/edits/{job_id}/events"]["get"]["responses"]["200"]["content"]
    )
    fields = schema["components"]["schemas"]["EditJobResponse"]["properties"]
    assert "description" in fields["queue_position"] and "description" in fields["estimated_wait_s"]
    params = schema["paths"]["/v1/edits"]["post"]["parameters"]
    assert any(p["name"] == "wait" for p in params)
