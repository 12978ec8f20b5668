"""Masks, output formats, new input formats and the resolution bucket at submission."""

import io

import pillow_heif
import pytest
from PIL import Image

from tests.api.test_edit_form import form_schema
from tests.conftest import image_bytes

PNG = image_bytes((64, 48))


def mask_bytes(size=(64, 48), box=(0, 0, 32, 48), fmt="PNG", background=0) -> bytes:
    mask = Image.new("L", size, background)
    mask.paste(255 - background, box)
    buf = io.BytesIO()
    mask.save(buf, format=fmt)
    return buf.getvalue()


def submit(client, image=PNG, mask=None, **fields):
    fields.setdefault("prompt", "change the background to a beach")
    files = {"image": ("shoe.png", image, "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    return client.post("/v1/edits", files=files, data={k: str(v) for k, v in fields.items()})


def test_a_mask_is_stored_beside_the_input(client, settings, tmp_path):
    response = submit(client, mask=mask_bytes(size=(640, 480)), mask_invert="true")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["mask"] is True
    assert body["params"]["mask_invert"] is True and body["params"]["mask_feather"] == 8
    job = client.app.state.jobs.get(body["id"])
    assert job.mask_key == f"edits/{job.id}/mask"
    storage = client.app.state.storage
    assert storage.get(job.mask_key) == mask_bytes(size=(640, 480))


def test_the_mask_does_not_split_batches(client):
    plain = client.app.state.jobs.get(submit(client).json()["id"])
    masked = client.app.state.jobs.get(submit(client, mask=mask_bytes()).json()["id"])
    assert plain.mask_key is None
    assert client.get(f"/v1/edits/{plain.id}").json()["mask"] is False
    assert plain.batch_key == masked.batch_key


@pytest.mark.parametrize(
    "size,bucket",
    [((1200, 800), "640x384"), ((800, 1200), "384x640"), ((512, 512), "512x512")],
)
def test_jobs_are_keyed_by_the_bucket_they_run_at(client, size, bucket):
    response = submit(client, image=image_bytes(size, fmt="JPEG"))
    job = client.app.state.jobs.get(response.json()["id"])
    assert job.batch_key == f"{bucket}:20:euler_ancestral:cfg"


# Checked with every other bad request in tests/api/test_edits.py.
BAD_MASKS_AND_OUTPUT_FIELDS = [
    ({"mask": b"not a picture at all"}, 422, "mask_not_an_image"),
    ({"mask": mask_bytes(box=(0, 0, 0, 0))}, 422, "mask_empty"),  # all black
    (
        {"mask": mask_bytes(background=255, box=(0, 0, 0, 0)), "mask_invert": "true"},
        422,
        "mask_empty",
    ),
    ({"mask": image_bytes((256, 256))[:300]}, 422, "mask_corrupt_image"),
    ({"mask": bytes(210_000)}, 413, "upload_too_large"),
    ({"mask_feather": 65}, 422, "invalid_mask_feather"),
    ({"output_format": "gif"}, 422, "invalid_output_format"),
    ({"output_size": "huge"}, 422, "invalid_output_size"),
    ({"output_quality": 0}, 422, "invalid_output_quality"),
    ({"output_quality": 101}, 422, "invalid_output_quality"),
]


def _heic(size=(120, 90)) -> bytes:
    buf = io.BytesIO()
    pillow_heif.from_pillow(Image.new("RGB", size, (20, 120, 200))).save(buf, format="HEIF")
    return buf.getvalue()


def _avif(size=(120, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (20, 120, 200)).save(buf, format="AVIF")
    return buf.getvalue()


@pytest.mark.parametrize("data,ctype", [(_heic(), "image/heif"), (_avif(), "image/avif")])
def test_phone_formats_are_accepted(client, data, ctype):
    response = submit(client, image=data)
    assert response.status_code == 202, response.text
    assert client.app.state.jobs.get(response.json()["id"]).input_content_type == ctype


def test_the_form_documents_mask_and_output_fields():
    fields, required = form_schema()
    assert "mask" not in required
    for name in ("mask", "mask_invert", "mask_feather", "output_size", "output_format"):
        assert fields[name].get("description"), name
