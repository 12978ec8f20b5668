"""The gateway against a real Redis: accepted jobs are stored and queued, rejected ones leave
no trace."""

import json
from datetime import timedelta

import pytest
import redis

from services.common.jobs import JobError, JobErrorCode, JobStatus
from tests.api.test_masks_and_formats import BAD_MASKS_AND_OUTPUT_FIELDS
from tests.common.test_images import mpo_bytes, png_header
from tests.conftest import image_bytes

PNG = image_bytes()


def submit(client, image=PNG, filename="shoe.png", content_type="image/png", mask=None, **fields):
    fields.setdefault("prompt", "make it red")
    files = {"image": (filename, image, content_type)} if image is not None else {}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    return client.post(
        "/v1/edits", files=files or None, data={k: str(v) for k, v in fields.items()}
    )


def test_submit_stores_input_records_job_and_enqueues_only_the_id(
    client, settings, queue_len, stored
):
    response = submit(client, seed=42, num_outputs=2, negative_prompt="blurry")
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/edits/{job['id']}"
    assert job["status"] == "queued"
    assert job["params"] == {
        "prompt": "make it red",
        "negative_prompt": "blurry",
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
        "image_guidance_scale": 1.5,
        "seed": 42,
        "num_outputs": 2,
        "scheduler": "euler_ancestral",
        "adapter": None,
        "output_size": "input",
        "output_format": "png",
        "output_quality": 90,
        "mask_invert": False,
        "mask_feather": 8,
    }
    assert job["progress"] == {"step": 0, "total": 20}
    assert job["outputs"] == [] and job["error"] is None
    assert stored() == [f"edits/{job['id']}/input"]

    assert queue_len() == 1
    message = json.loads(redis.Redis.from_url(settings.redis_url).lindex("edits", 0))
    assert message["headers"]["task"] == "instructedit.edit"
    assert message["headers"]["id"] == job["id"]
    # The broker message carries the job id and nothing of the image.
    assert len(message["body"]) < 400

    polled = client.get(f"/v1/edits/{job['id']}").json()
    assert polled["id"] == job["id"] and polled["status"] == "queued"


def test_server_picks_and_reports_a_seed(client):
    seeds = {submit(client).json()["params"]["seed"] for _ in range(3)}
    assert all(isinstance(s, int) for s in seeds) and len(seeds) > 1


@pytest.mark.parametrize("fmt,ctype", [("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_other_formats_accepted(client, fmt, ctype):
    assert submit(client, image=image_bytes(fmt=fmt), content_type=ctype).status_code == 202


def test_multi_picture_jpeg_from_a_phone_is_accepted_as_jpeg(client):
    response = submit(client, image=mpo_bytes(), filename="IMG_0001.JPG", content_type="image/jpeg")
    assert response.status_code == 202, response.text
    assert client.app.state.jobs.get(response.json()["id"]).input_content_type == "image/jpeg"


BAD_REQUESTS = [
    ({"image": b"plain text, not a picture"}, 422, "not_an_image"),
    ({"image": image_bytes((256, 256))[:300]}, 422, "corrupt_image"),
    ({"image": image_bytes(fmt="GIF", mode="P")}, 415, "unsupported_image_format"),
    ({"image": b""}, 422, "empty_image"),
    ({"image": bytes(300_000)}, 413, "upload_too_large"),
    # Over the image limit but within the form's allowance: the check after parsing.
    ({"image": bytes(210_000)}, 413, "upload_too_large"),
    ({"image": png_header(8000, 7000)}, 413, "image_too_large"),
    ({"image": png_header(10000, 10000)}, 413, "image_too_large"),
    ({"image": png_header(20000, 10000)}, 413, "image_too_large"),
    ({"image": None}, 422, "missing_image"),
    ({"prompt": ""}, 422, "missing_prompt"),  # an empty form field is an absent one
    ({"prompt": "   "}, 422, "invalid_prompt"),
    ({"prompt": "x" * 501}, 422, "invalid_prompt"),
    ({"num_inference_steps": 0}, 422, "invalid_num_inference_steps"),
    ({"num_inference_steps": 101}, 422, "invalid_num_inference_steps"),
    ({"num_inference_steps": "ten"}, 422, "invalid_num_inference_steps"),
    # Form numbers are plain decimals: pydantic alone would read "2_0" as 20.
    ({"num_inference_steps": "2_0"}, 422, "invalid_num_inference_steps"),
    ({"num_inference_steps": " 20"}, 422, "invalid_num_inference_steps"),
    ({"seed": "1_000"}, 422, "invalid_seed"),
    ({"guidance_scale": "7_5"}, 422, "invalid_guidance_scale"),
    ({"guidance_scale": -1}, 422, "invalid_guidance_scale"),
    ({"image_guidance_scale": 11}, 422, "invalid_image_guidance_scale"),
    ({"num_outputs": 5}, 422, "invalid_num_outputs"),
    ({"num_outputs": 0}, 422, "invalid_num_outputs"),
    ({"seed": -1}, 422, "invalid_seed"),
    ({"seed": 2**32}, 422, "invalid_seed"),
    ({"negative_prompt": "n" * 501}, 422, "invalid_negative_prompt"),
    ({"scheduler": "heun"}, 422, "invalid_scheduler"),
    # LCM draws its steps from a 50-step schedule.
    ({"scheduler": "lcm", "num_inference_steps": 51}, 422, "invalid_scheduler"),
    *BAD_MASKS_AND_OUTPUT_FIELDS,
]


@pytest.mark.parametrize("fields,status,code", BAD_REQUESTS)
def test_bad_requests_are_rejected_and_leave_nothing(
    client, queue_len, job_keys, stored, fields, status, code
):
    response = submit(client, **fields)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    if code == "mask_empty":
        assert "all black" in error["message"] and "white" in error["message"]
    assert queue_len() == 0
    assert job_keys() == []
    assert stored() == []


def test_missing_prompt(client, queue_len):
    response = client.post("/v1/edits", files={"image": ("a.png", PNG, "image/png")})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "missing_prompt"
    assert queue_len() == 0


@pytest.mark.parametrize(
    "method,path",
    [
        ("get", "/v1/edits/doesnotexist"),
        ("get", "/v1/edits/doesnotexist/outputs/0"),
        ("post", "/v1/edits/doesnotexist/cancel"),
    ],
)
def test_unknown_job_is_404(client, method, path):
    response = getattr(client, method)(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"


def test_cancel_queued_job_then_cancel_again_returns_it_again(client, settings):
    job = submit(client).json()
    store = client.app.state.jobs
    key = store.get(job["id"]).batch_key
    assert key == "576x448:20:euler_ancestral:cfg"  # the 4:3 bucket of a 512 px budget
    assert store.pending(key, 10) == [job["id"]]
    canceled = client.post(f"/v1/edits/{job['id']}/cancel")
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"
    assert canceled.json()["finished_at"] is not None
    assert store.pending(key, 10) == []  # no worker will look at it for a batch
    # Canceling is idempotent: a retried cancel gets the canceled job, unchanged.
    again = client.post(f"/v1/edits/{job['id']}/cancel")
    assert again.status_code == 200, again.text
    assert again.json() == canceled.json()


@pytest.mark.parametrize("ended", [JobStatus.succeeded, JobStatus.failed])
def test_cancel_of_a_job_that_ended_otherwise_is_409(client, ended):
    job_id = submit(client).json()["id"]
    jobs = client.app.state.jobs
    claimed = jobs.claim(job_id, timedelta(seconds=60)).job
    if ended == JobStatus.succeeded:
        jobs.succeed(claimed, [])
    else:
        jobs.fail(claimed, JobError.of(JobErrorCode.internal_error))
    response = client.post(f"/v1/edits/{job_id}/cancel")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_finished"
    assert client.app.state.jobs.get(job_id).status == ended


def test_outputs_of_unfinished_job_are_409(client):
    job = submit(client).json()
    response = client.get(f"/v1/edits/{job['id']}/outputs/0")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_not_succeeded"


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "redis": "ok",
        "storage": "ok",
        "workers": [],
        "engines": [],
    }


def test_readiness_fails_without_redis(settings, tmp_path):
    from fastapi.testclient import TestClient

    from services.api.main import create_app

    broken = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["ready"] is False
    assert ready.json()["redis"] == "unavailable"  # the cause is in the log, not here


def test_openapi_documents_the_edit_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/v1/edits",
        "/v1/edits/{job_id}",
        "/v1/edits/{job_id}/outputs/{index}",
        "/v1/edits/{job_id}/cancel",
    } <= set(paths)
