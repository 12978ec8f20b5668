"""The sync SDK against the real stack: submit, follow, download, list, cancel, delete,
typed errors, events, datasets."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from instructedit import (
    APIConnectionError,
    AuthenticationError,
    Client,
    ConflictError,
    InvalidRequestError,
    Job,
    JobFailed,
    NotFoundError,
)
from tests.client.conftest import Recorder
from tests.conftest import image_bytes
from tests.stack import free_port

pytestmark = pytest.mark.e2e

# Large latents make each tiny-model step slow enough to cancel or follow mid-run.
SLOW = {"num_inference_steps": 100}


def slow_photo() -> bytes:
    return image_bytes((256, 256))


def test_edit_and_wait_reports_progress_until_succeeded(client):
    seen: list[tuple[str, int, int]] = []
    job = client.edit(image_bytes(), "make it red", num_inference_steps=4, seed=7)
    assert isinstance(job, Job) and job.status == "queued" and not job.finished
    assert job.params["seed"] == 7 and job.progress_total == 4

    finished = job.wait(
        progress=lambda j: seen.append((j.status, j.progress_step, j.progress_total)),
        timeout=60,
    )
    assert finished is job and job.finished and job.status == "succeeded"
    assert job.progress_step == job.progress_total == 4
    assert seen and seen[-1] == ("succeeded", 4, 4)
    steps = [step for _, step, _ in seen]
    assert steps == sorted(steps), seen
    assert len(job.outputs) == 1 and job.outputs[0].startswith("http")
    assert job.raise_for_status() is job
    # The server drew nothing but the seed: the defaults are the API's own.
    assert job.params["guidance_scale"] == 7.5


def test_progress_callback_sees_each_step_of_a_running_job(client):
    steps: list[int] = []
    job = client.edit(slow_photo(), "make it red", num_inference_steps=60)
    job.wait(progress=lambda j: steps.append(j.progress_step), timeout=60)
    assert job.status == "succeeded"
    assert steps == sorted(steps) and steps[-1] == 60
    # Steps came one by one from the stream, not only the final state.
    assert len(set(steps)) >= 3, steps


def test_download_writes_images_in_the_requested_format(client, tmp_path):
    job = client.edit(
        image_bytes((64, 48)),
        "make it red",
        num_inference_steps=2,
        num_outputs=2,
        output_format="webp",
    ).wait(timeout=60)
    paths = client.download(job, tmp_path / "out")
    assert [p.name for p in paths] == [f"{job.id}-0.webp", f"{job.id}-1.webp"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "WEBP" and image.size == (64, 48)

    single = client.edit(
        image_bytes((64, 48)), "make it blue", num_inference_steps=2, output_format="jpeg"
    ).wait(timeout=60)
    # By id, as the CLI would; with a stem of its own.
    [path] = client.download(single.id, tmp_path, stem="hoodie")
    assert path == tmp_path / "hoodie.jpg"
    assert Image.open(io.BytesIO(path.read_bytes())).format == "JPEG"
    assert not list(tmp_path.glob(".*.part"))


def test_get_list_cancel_delete(stack, own_key):
    with Client(stack.base_url, own_key) as client:
        made = [client.edit(image_bytes(), f"edit {i}", num_inference_steps=1) for i in range(3)]
        got = client.get(made[0].id)
        assert got.id == made[0].id and got.params["prompt"] == "edit 0"

        recorder = Recorder()
        with Client(stack.base_url, own_key, transport=recorder) as paging:
            listed = list(paging.list(limit=2))
        # Newest first, across two pages.
        assert [j.id for j in listed] == [j.id for j in reversed(made)]
        pages = [r for r, _ in recorder.exchanges if r.url.path == "/v1/edits"]
        assert len(pages) == 2 and "cursor" in pages[1].url.params

        slow = client.edit(slow_photo(), "make it red", **SLOW)
        with pytest.raises(TimeoutError):
            slow.wait(timeout=0.5)
        canceled = client.cancel(slow.id)
        assert canceled.status == "canceled" and canceled.finished
        assert slow.cancel().status == "canceled"  # again: the job as it stands
        with pytest.raises(JobFailed, match="canceled"):
            canceled.raise_for_status()
        assert [j.id for j in client.list(status="canceled")] == [slow.id]

        done = made[0].wait(timeout=60)
        assert done.status == "succeeded"
        with pytest.raises(ConflictError) as raised:
            client.cancel(done.id)
        assert raised.value.code == "job_finished" and raised.value.status_code == 409

        assert client.delete(slow.id) is None
        with pytest.raises(NotFoundError):
            client.get(slow.id)


def test_typed_errors_carry_the_apis_code(stack, client):
    stranger = Client(stack.base_url, "ie_000000000000_not-a-key")
    with stranger, pytest.raises(AuthenticationError) as raised:
        stranger.get("anything")
    assert raised.value.status_code == 401 and raised.value.code == "unauthorized"

    with pytest.raises(NotFoundError) as raised:
        client.get("no-such-job")
    assert raised.value.code == "job_not_found" and raised.value.status_code == 404
    assert "no-such-job" in raised.value.message

    # A refusal only the server can make (the bytes are not an image).
    with pytest.raises(InvalidRequestError) as raised:
        client.edit(b"this is not an image", "make it red")
    assert raised.value.status_code == 422 and raised.value.code == "not_an_image"


def test_idempotency_key_returns_the_same_job(client):
    first = client.edit(image_bytes(), "make it red", num_inference_steps=1, idempotency_key="k1")
    again = client.edit(image_bytes(), "make it red", num_inference_steps=1, idempotency_key="k1")
    assert again.id == first.id
    other = client.edit(image_bytes(), "make it red", num_inference_steps=1)
    assert other.id != first.id


def test_events_yield_status_progress_and_a_final_completed(client):
    job = client.edit(slow_photo(), "make it red", num_inference_steps=40)
    events = list(client.events(job.id))
    names = [e["event"] for e in events]
    assert names[0] == "status" and names[-1] == "completed", names
    assert "progress" in names, names
    assert all(set(e) == {"event", "id", "data"} for e in events)
    assert events[-1]["data"]["id"] == job.id
    assert events[-1]["data"]["status"] == "succeeded"
    steps = [e["data"]["step"] for e in events if e["event"] == "progress"]
    assert steps == sorted(steps) and steps[-1] == 40
    # A finished job's stream is its final event alone.
    assert [e["event"] for e in client.events(job.id)] == ["completed"]


def test_wait_polls_when_the_event_stream_fails(stack):
    recorder = Recorder(refuse="/events")
    with Client(stack.base_url, stack.key.key, transport=recorder, max_retries=1) as client:
        seen = []
        job = client.edit(image_bytes(), "make it red", num_inference_steps=2)
        job.wait(progress=lambda j: seen.append(j.status), timeout=60)
    assert job.status == "succeeded" and seen[-1] == "succeeded"
    paths = [r.url.path for r, _ in recorder.exchanges]
    assert any(p.endswith("/events") for p in paths)
    assert paths.count(f"/v1/edits/{job.id}") >= 1


def test_server_down_is_a_connection_error_at_once():
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    client = Client(url, "key", max_retries=1)
    with client, pytest.raises(APIConnectionError) as raised:
        client.get("anything")
    assert time.monotonic() - started < 5
    assert str(raised.value) == f"cannot reach the InstructEdit API at {url}: connection refused"
    assert "\n" not in str(raised.value)


def test_datasets_create_get_list_cancel(client):
    run = client.datasets.create(num_rows=3, seed=11, pairs_per_row=1)
    assert run["status"] == "queued" and run["progress"]["rows_total"] == 3
    assert client.datasets.get(run["id"])["id"] == run["id"]
    # The same spec again is the same run.
    assert client.datasets.create(num_rows=3, seed=11, pairs_per_row=1)["id"] == run["id"]
    assert run["id"] in [r["id"] for r in client.datasets.list(status="queued")]
    assert client.datasets.cancel(run["id"])["status"] == "canceled"
    assert client.datasets.cancel(run["id"])["status"] == "canceled"
    with pytest.raises(NotFoundError) as raised:
        client.datasets.get("no-such-run")
    assert raised.value.code == "run_not_found"


def test_datasets_from_your_own_captions_and_the_reasons_for_a_refusal(client):
    run = client.datasets.create(captions=["black hoodie"], edits_per_caption=2, pairs_per_row=1)
    assert run["spec"]["rows_count"] == 2
    client.datasets.cancel(run["id"])
    with pytest.raises(InvalidRequestError) as raised:
        client.datasets.create(captions=["black hoodie", "a bottle of olive oil"])
    assert raised.value.code == "captions_unmapped"
    assert [d["index"] for d in raised.value.details] == [1]
