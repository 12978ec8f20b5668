"""A job's progress as it happens, through the real stack: server-sent events from the
worker's writes, queue positions and `POST /v1/edits?wait=`."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from httpx_sse import connect_sse

from services.common.job_events import stream_id
from tests.conftest import image_bytes
from tests.e2e.test_edit_flow import LONG, long_photo, submit

pytestmark = pytest.mark.e2e


def stream(client: httpx.Client, job_id: str, **headers: str):
    return connect_sse(client, "GET", f"/v1/edits/{job_id}/events", headers=headers)


def data(event) -> dict:
    return json.loads(event.data)


def started_blocker(stack, client) -> dict:
    """A long job holding the single worker, so that the next ones stay queued."""
    blocker = submit(client, long_photo(), **LONG)
    stack.wait_for(blocker["id"], lambda j: j["status"] == "running")
    return blocker


def test_stream_of_a_job_from_queued_to_completed(stack):
    with stack.client() as client:
        blocker = started_blocker(stack, client)
        job = submit(client, num_inference_steps=8)
        events = []
        with stream(client, job["id"]) as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            for event in source.iter_sse():
                events.append(event)
                if event.event == "queue_position":
                    # Seen queued: let it run.
                    client.post(f"/v1/edits/{blocker['id']}/cancel")
        # The stream ended by itself, after the final event.
    names = [e.event for e in events]
    assert names[:3] == ["status", "queue_position", "status"], names
    assert data(events[0])["status"] == "queued"
    assert data(events[1])["queue_position"] == 1
    assert set(data(events[1])) == {"queue_position", "estimated_wait_s"}
    assert data(events[2])["status"] == "running"
    steps = [data(e)["step"] for e in events if e.event == "progress"]
    assert steps and steps == sorted(set(steps)) and steps[-1] == 8, steps
    assert names[-1] == "completed"
    final = data(events[-1])
    assert final["status"] == "succeeded" and final["progress"] == {"step": 8, "total": 8}
    assert [o["index"] for o in final["outputs"]] == [0]
    ids = [stream_id(e.id) for e in events[2:] if e.event != "queue_position"]
    assert all(ids) and ids == sorted(set(ids))


def test_canceled_job_stream_ends_with_canceled(stack):
    with stack.client() as client:
        job = submit(client, long_photo(), **LONG)
        events = []
        with stream(client, job["id"]) as source:
            for event in source.iter_sse():
                events.append(event)
                if event.event == "progress" and data(event)["step"] >= 2:
                    assert client.post(f"/v1/edits/{job['id']}/cancel").status_code == 200
        final = client.get(f"/v1/edits/{job['id']}").json()
    assert events[-1].event == "canceled"
    assert data(events[-1])["status"] == "canceled"
    assert data(events[-1]) == final


def test_reconnect_with_last_event_id_resumes_at_the_current_state(stack):
    with stack.client() as client:
        job = submit(client, long_photo(), **LONG)
        first: list = []
        with stream(client, job["id"]) as source:
            for event in source.iter_sse():
                first.append(event)
                if event.event == "progress" and data(event)["step"] >= 2:
                    break  # the connection drops
        last_id = first[-1].id
        seen_step = data(first[-1])["step"]
        stack.wait_for(job["id"], lambda j: j["progress"]["step"] > seen_step + 2)

        again: list = []
        with stream(client, job["id"], **{"Last-Event-ID": last_id}) as source:
            for event in source.iter_sse():
                again.append(event)
                if len(again) == 1:
                    client.post(f"/v1/edits/{job['id']}/cancel")
    # First where the job stands now (never the steps missed), then on to its end.
    assert again[0].event == "status"
    assert data(again[0])["status"] == "running"
    assert data(again[0])["progress"]["step"] > seen_step + 2
    assert again[-1].event == "canceled"
    first_ids = {e.id for e in first}
    again_ids = [stream_id(e.id) for e in again]
    assert not first_ids & {e.id for e in again}  # no duplicates
    assert again_ids == sorted(set(again_ids)) and again_ids[0] > stream_id(last_id)
    steps = [data(e)["step"] for e in again if e.event == "progress"]
    assert all(step > data(again[0])["progress"]["step"] for step in steps)


def test_unknown_job_stream_is_404(stack):
    with stack.client() as client:
        response = client.get("/v1/edits/doesnotexist/events")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"


def submit_waiting(client, wait: float, image: bytes | None = None, **fields):
    fields.setdefault("prompt", "print a spiderman logo on it")
    return client.post(
        f"/v1/edits?wait={wait}",
        files={"image": ("hoodie.png", image or image_bytes((64, 48)), "image/png")},
        data={k: str(v) for k, v in fields.items()},
    )


def test_wait_answers_200_with_a_job_that_finished_in_time(stack):
    with stack.client() as client:
        response = submit_waiting(client, 60, num_inference_steps=2)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded" and job["outputs"]
    assert response.headers["location"] == f"/v1/edits/{job['id']}"


def test_wait_answers_202_with_a_job_still_going(stack):
    with stack.client() as client:
        started = time.monotonic()
        response = submit_waiting(client, 1, long_photo(), **LONG)
        took = time.monotonic() - started
        job = response.json()
        client.post(f"/v1/edits/{job['id']}/cancel")
    assert response.status_code == 202, response.text
    assert job["status"] in ("queued", "running")
    assert 1 <= took < 10


def test_queue_position_counts_down(stack):
    with stack.client() as client:
        blocker = started_blocker(stack, client)
        queued = [submit(client, num_inference_steps=1) for _ in range(3)]
        assert [job["queue_position"] for job in queued] == [1, 2, 3]
        assert client.get(f"/v1/edits/{blocker['id']}").json()["queue_position"] is None

        positions = []
        with stream(client, queued[2]["id"]) as source:
            events = source.iter_sse()
            for event in events:
                if event.event == "queue_position":
                    positions.append(data(event)["queue_position"])
                    if len(positions) == 1:
                        client.post(f"/v1/edits/{queued[0]['id']}/cancel")
                    elif len(positions) == 2:
                        break
            assert positions == [3, 2]
            assert client.get(f"/v1/edits/{queued[2]['id']}").json()["queue_position"] == 2
            client.post(f"/v1/edits/{blocker['id']}/cancel")
            rest = [e.event for e in events]
        assert rest[-1] == "completed"
        done = stack.wait_finished(queued[2]["id"])
    assert done["status"] == "succeeded" and done["queue_position"] is None
