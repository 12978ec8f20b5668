"""How the API takes its input apart, against a real Redis over HTTP (TestClient): large
and cut-off images, the decode slots, duplicate and malformed fields, 405s, the public
readiness answer and the base of output URLs."""

from __future__ import annotations

import io
import logging
import threading
import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from services.api import uploads
from services.api.main import create_app
from services.common.settings import get_settings
from services.common.storage import PROBE_PREFIX
from tests.api.conftest import keyed_client
from tests.api.test_edits import PNG, submit
from tests.common.test_images import photo_like


def jpeg(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **save)
    return buf.getvalue()


@pytest.fixture
def roomy_client(settings):
    """A client whose upload limit takes a 7000x7000 JPEG."""
    roomy = settings.model_copy(update={"max_upload_bytes": 2_000_000})
    with keyed_client(create_app(roomy)) as client:
        yield client


def test_large_jpeg_is_checked_at_an_eighth_of_its_size(roomy_client, decoded_sizes):
    data = jpeg(Image.new("RGB", (7000, 7000), (120, 130, 140)), quality=80)
    loaded = decoded_sizes
    response = submit(roomy_client, image=data, filename="big.jpg", content_type="image/jpeg")
    assert response.status_code == 202, response.text
    # The API never held the 49 MP picture: 875x875 pixels at most (147 MB vs 2.3 MB).
    assert loaded and all(w <= 875 and h <= 875 for w, h in loaded)
    job = roomy_client.app.state.jobs.get(response.json()["id"])
    assert job.batch_key.startswith("512x512:")  # sized from the header's 7000x7000


def test_tiny_jpeg_declaring_7000x7000_is_corrupt(client, stored):
    full = jpeg(Image.new("RGB", (7000, 7000), (120, 130, 140)))
    sos = full.index(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(full[sos + 2 : sos + 4], "big")
    bomb = full[: scan + 20] + b"\xff\xd9"  # a few bytes of image data, then the end
    response = submit(client, image=bomb, filename="bomb.jpg", content_type="image/jpeg")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "corrupt_image"
    assert stored() == []


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_jpeg_missing_part_of_its_data_is_corrupt(client, stored, fraction, progressive):
    data = jpeg(photo_like((256, 192)), quality=90, progressive=progressive)
    cut = data[: int(len(data) * fraction)]
    response = submit(client, image=cut, filename="cut.jpg", content_type="image/jpeg")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "corrupt_image"
    assert stored() == []


def test_decodes_beyond_the_slots_wait(client, monkeypatch):
    monkeypatch.setenv("INSTRUCTEDIT_MAX_CONCURRENT_DECODES", "2")
    get_settings.cache_clear()
    uploads.decode_slots.cache_clear()
    running = peak = 0
    lock = threading.Lock()
    real_check = uploads.check_image_upload

    def slow_check(data):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.2)
        with lock:
            running -= 1
        return real_check(data)

    monkeypatch.setattr(uploads, "check_image_upload", slow_check)
    try:
        statuses: list[int] = []
        threads = [
            threading.Thread(target=lambda: statuses.append(submit(client).status_code))
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        get_settings.cache_clear()
        uploads.decode_slots.cache_clear()
    assert statuses == [202] * 6
    assert peak == 2


@pytest.mark.parametrize("field", ["prompt", "num_inference_steps"])
def test_duplicate_form_fields_are_refused(client, stored, queue_len, field):
    values = {"prompt": ["make it red", "make it blue"], "num_inference_steps": ["5", "50"]}
    data = {"prompt": "make it red", field: values[field]}
    response = client.post("/v1/edits", files={"image": ("shoe.png", PNG, "image/png")}, data=data)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "duplicate_field"
    assert field in error["message"]
    assert stored() == [] and queue_len() == 0


def test_405_names_the_allowed_methods(client):
    response = client.delete("/v1/edits")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"
    assert "GET" in client.put("/v1/edits/abc").headers["allow"]


def test_invalid_json_is_named_as_such(client):
    response = client.post(
        "/v1/datasets", content=b'{"rows": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_json"
    assert "not valid JSON" in error["message"]


def test_readiness_shows_no_addresses_and_logs_them(settings, caplog):
    broken = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client, caplog.at_level(logging.WARNING):
        ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["redis"] == "unavailable"
    assert "127.0.0.1" not in ready.text and "6379" not in ready.text
    assert any("Redis is unavailable" in r.getMessage() for r in caplog.records)


def test_readiness_fails_when_storage_takes_no_writes(client, settings, tmp_path, stored):
    assert client.get("/readyz").status_code == 200
    assert stored() == []  # the write probe leaves nothing behind
    # Reads still work; writes under the probe's prefix fail (a file is in the way).
    probes = tmp_path / "storage" / PROBE_PREFIX.rstrip("/")
    probes.rmdir()  # what the probe left: an empty directory
    probes.write_bytes(b"in the way")
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["storage"] == "unavailable"
    assert str(tmp_path) not in ready.text


def succeeded_job(client) -> str:
    job_id = submit(client).json()["id"]
    jobs = client.app.state.jobs
    claimed = jobs.claim(job_id, timedelta(seconds=60)).job
    jobs.succeed(claimed, [f"edits/{job_id}/output_0.png"])
    return job_id


def test_output_urls_ignore_the_host_header(client):
    job_id = succeeded_job(client)
    job = client.get(f"/v1/edits/{job_id}", headers={"host": "evil.example"}).json()
    # Unset, the base is where `make run` serves; the client's Host is never used.
    url = job["outputs"][0]["url"]
    assert url.startswith(f"http://127.0.0.1:8000/v1/edits/{job_id}/outputs/0?expires=")


def test_output_urls_use_the_configured_base(settings):
    public = settings.model_copy(update={"public_base_url": "https://edit.example.com/api/"})
    with keyed_client(create_app(public)) as client:
        job_id = succeeded_job(client)
        job = client.get(f"/v1/edits/{job_id}", headers={"host": "evil.example"}).json()
    url = job["outputs"][0]["url"]
    assert url.startswith(f"https://edit.example.com/api/v1/edits/{job_id}/outputs/0?expires=")
