"""Submit, poll, download and cancel through the real stack."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import image_bytes
from tests.reference import stock_edit

pytestmark = pytest.mark.e2e


def submit(client, image: bytes | None = None, **fields) -> dict:
    fields.setdefault("prompt", "print a spiderman logo on it")
    response = client.post(
        "/v1/edits",
        files={"image": ("hoodie.png", image or image_bytes((64, 48)), "image/png")},
        data={k: str(v) for k, v in fields.items()},
    )
    assert response.status_code == 202, response.text
    return response.json()


def direct_pipeline_outputs(model_dir, image_png: bytes, params: dict) -> list[np.ndarray]:
    image = Image.open(io.BytesIO(image_png)).convert("RGB")
    return [np.asarray(im) for im in stock_edit(model_dir, image, params)]


# A photo at a size of the model's bucket set (the tiny model's budget is 128 px) runs at
# that size, untouched, at either output size.
BUCKET = (128, 128)


@pytest.mark.parametrize("num_outputs,output_size", [(1, "model"), (2, "input")])
def test_edit_matches_the_pipeline_pixel_for_pixel(stack, tiny_model_dir, num_outputs, output_size):
    photo = image_bytes(BUCKET)
    with stack.client() as client:
        job = submit(
            client,
            photo,
            output_size=output_size,
            num_inference_steps=5,
            guidance_scale=7.0,
            image_guidance_scale=1.4,
            seed=2024,
            num_outputs=num_outputs,
        )
        done = stack.wait_finished(job["id"])
        assert done["status"] == "succeeded", done
        assert done["progress"] == {"step": 5, "total": 5}
        assert done["started_at"] and done["finished_at"]
        assert [o["index"] for o in done["outputs"]] == list(range(num_outputs))

        expected = direct_pipeline_outputs(tiny_model_dir, photo, done["params"])
        for output, reference in zip(done["outputs"], expected, strict=True):
            route = f"/v1/edits/{job['id']}/outputs/{output['index']}"
            # Signed for a short while: it downloads without the key.
            assert output["url"].startswith(f"{stack.base_url}{route}?expires=")
            response = httpx.get(output["url"])
            assert response.status_code == 200
            assert response.headers["content-type"] == "image/png"
            got = Image.open(io.BytesIO(response.content))
            assert got.format == "PNG" and got.size == BUCKET
            assert np.array_equal(np.asarray(got), reference)

    storage_root = Path(stack.settings["storage_url"].removeprefix("file://"))
    job_dir = storage_root / "edits" / job["id"]
    stored = sorted(p.relative_to(job_dir).parts for p in job_dir.rglob("*") if p.is_file())
    # The outputs sit under the id of the claim that produced them.
    (attempt,) = {parts[0] for parts in stored if len(parts) == 2}
    assert stored == [(attempt, f"output_{i}.png") for i in range(num_outputs)] + [("input",)]


def test_readiness_sees_the_worker(stack):
    with stack.client() as client:
        ready = client.get("/readyz").json()
    assert ready["ready"] is True
    assert any(name.startswith("worker-") for name in ready["workers"])
    # The engine is announced only once loaded and warmed up.
    (engine,) = ready["engines"]
    assert engine["model"] == stack.settings["model"]
    assert engine["family"] == "sd15"
    assert (engine["device"], engine["dtype"], engine["attention"]) == ("cpu", "float32", "sdpa")
    assert engine["compiled"] is False and engine["max_batch"] == 8
    # Its warm-up, timed, and the buckets it runs at.
    assert engine["warmup_s"] > 0 and engine["resolution"] == 128


LONG = {"num_inference_steps": 100}


def long_photo() -> bytes:
    # Large latents make each tiny-model step slow enough to cancel mid-run.
    return image_bytes((256, 256))


def test_cancel_running_job_stops_at_next_step(stack):
    with stack.client() as client:
        job = submit(client, long_photo(), **LONG)
        running = stack.wait_for(job["id"], lambda j: j["progress"]["step"] >= 2)
        assert running["status"] == "running"
        canceled = client.post(f"/v1/edits/{job['id']}/cancel")
        assert canceled.status_code == 200
        assert canceled.json()["status"] == "canceled"
        step_at_cancel = canceled.json()["progress"]["step"]

        # The worker notices at its next step; its later progress writes are refused.
        follow_up = submit(client, num_inference_steps=1)
        assert stack.wait_finished(follow_up["id"])["status"] == "succeeded"
        final = client.get(f"/v1/edits/{job['id']}").json()
        assert final["status"] == "canceled"
        assert final["outputs"] == []
        assert final["progress"]["step"] == step_at_cancel < 100
        again = client.post(f"/v1/edits/{job['id']}/cancel")  # idempotent, as retries need
        assert again.status_code == 200 and again.json()["status"] == "canceled"
    assert f"job {job['id']} was canceled while running" in stack.worker.log()


def test_cancel_queued_job_never_runs(stack):
    with stack.client() as client:
        blocker = submit(client, long_photo(), **LONG)
        stack.wait_for(blocker["id"], lambda j: j["status"] == "running")
        queued = submit(client, num_inference_steps=1)
        assert client.get(f"/v1/edits/{queued['id']}").json()["status"] == "queued"
        assert client.post(f"/v1/edits/{queued['id']}/cancel").json()["status"] == "canceled"
        client.post(f"/v1/edits/{blocker['id']}/cancel")
        # A job submitted after the canceled one is handled after it (one worker, FIFO).
        after = submit(client, num_inference_steps=1)
        assert stack.wait_finished(after["id"])["status"] == "succeeded"
        final = client.get(f"/v1/edits/{queued['id']}").json()
    assert final["status"] == "canceled"
    assert final["started_at"] is None
    assert f"job {queued['id']} is canceled; not running it" in stack.worker.log()


def _input_path(stack, job_id: str) -> Path:
    return Path(stack.settings["storage_url"].removeprefix("file://")) / "edits" / job_id / "input"


@pytest.mark.parametrize(
    "damage,code",
    [
        (lambda path: path.write_bytes(path.read_bytes()[:100]), "input_invalid"),
        (lambda path: path.unlink(), "input_missing"),
    ],
    ids=["corrupted", "deleted"],
)
def test_damaged_stored_input_fails_the_job(stack, damage, code):
    with stack.client() as client:
        blocker = submit(client, long_photo(), **LONG)
        stack.wait_for(blocker["id"], lambda j: j["status"] == "running")
        victim = submit(client, image_bytes((256, 256)), num_inference_steps=1)
        damage(_input_path(stack, victim["id"]))
        client.post(f"/v1/edits/{blocker['id']}/cancel")
        done = stack.wait_finished(victim["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == code
    assert victim["id"] in done["error"]["message"] or "image" in done["error"]["message"]
    assert done["finished_at"] is not None


def test_jobs_queued_together_run_as_one_batch(stack, tiny_model_dir):
    photo = image_bytes(BUCKET)
    with stack.client() as client:
        blocker = submit(client, long_photo(), **LONG)
        stack.wait_for(blocker["id"], lambda j: j["status"] == "running")
        batch = [
            submit(client, photo, prompt=prompt, seed=seed, num_inference_steps=3)
            for prompt, seed in [("make it red", 1), ("print a logo on it", 2), ("on sand", 3)]
        ]
        client.post(f"/v1/edits/{blocker['id']}/cancel")
        finished = [stack.wait_finished(job["id"]) for job in batch]
        assert [job["status"] for job in finished] == ["succeeded"] * 3
        for job in finished:
            png = client.get(job["outputs"][0]["url"]).content
            got = np.asarray(Image.open(io.BytesIO(png)), dtype=int)
            (alone,) = direct_pipeline_outputs(tiny_model_dir, photo, job["params"])
            # Within one intensity level of running alone (see tests/gpu_worker/test_batching.py).
            assert np.abs(got - alone.astype(int)).max() <= 1
    first, *others = (job["id"] for job in batch)
    assert f"job {first} runs in a batch with {others}" in stack.worker.log()


def test_request_id_and_metrics_follow_the_job_into_the_worker(stack):
    import httpx

    with stack.client() as client:
        response = client.post(
            "/v1/edits",
            files={"image": ("a.png", image_bytes(), "image/png")},
            data={"prompt": "make it green", "num_inference_steps": "2"},
            headers={"X-Request-ID": "req-e2e-4242"},
        )
        assert response.headers["x-request-id"] == "req-e2e-4242"
        job = response.json()
        assert stack.wait_finished(job["id"])["status"] == "succeeded"
    worker_lines = [line for line in stack.worker.log().splitlines() if "req-e2e-4242" in line]
    assert any(f"job {job['id']} succeeded" in line for line in worker_lines)
    record = json.loads(worker_lines[-1][worker_lines[-1].index("{") :])
    assert record["request_id"] == "req-e2e-4242" and record["job_id"] == job["id"]

    port = stack.settings["worker_metrics_port"]
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert "instructedit_worker_job_duration_seconds_count" in metrics
    assert "instructedit_worker_queue_wait_seconds_count" in metrics
