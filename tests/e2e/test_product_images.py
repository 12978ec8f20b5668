"""Product-grade images through the real stack: full resolution, masks, formats, colour.

The tiny model's budget is 128 px, so every photo here runs at a tiny bucket and comes
back at its own size; the pixel checks do not depend on the model's (random) pictures.
"""

from __future__ import annotations

import io

import numpy as np
import pillow_heif
import pytest
from PIL import Image, ImageCms

from services.common.images import SRGB_ICC_PROFILE
from tests.common.icc_profiles import display_p3

pytestmark = pytest.mark.e2e

FEATHER = 8


def photo(size=(1200, 800), seed=0) -> Image.Image:
    """A textured product photo: fine detail everywhere, so nothing matches by chance."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)
    noise = rng.integers(-20, 20, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=int) + noise, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def left_half_mask(size) -> bytes:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return encoded(mask, "PNG")


def run(stack, client, image: bytes, mask: bytes | None = None, **fields) -> tuple[dict, list]:
    fields = {"prompt": "change the background to a beach", "num_inference_steps": 2, **fields}
    files = {"image": ("photo", image, "application/octet-stream")}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    response = client.post("/v1/edits", files=files, data={k: str(v) for k, v in fields.items()})
    assert response.status_code == 202, response.text
    done = stack.wait_finished(response.json()["id"])
    assert done["status"] == "succeeded", done
    return done, [client.get(output["url"]) for output in done["outputs"]]


def test_a_jpeg_comes_back_at_its_own_size(stack):
    with stack.client() as client:
        _, (response,) = run(stack, client, encoded(photo(), "JPEG", quality=92))
    output = Image.open(io.BytesIO(response.content))
    assert output.size == (1200, 800)
    assert response.headers["content-type"] == "image/png"
    assert output.info["icc_profile"] == SRGB_ICC_PROFILE  # tagged sRGB


def test_outside_the_mask_the_output_is_the_input_to_the_byte(stack):
    original = photo()
    jpeg = encoded(original, "JPEG", quality=92)
    decoded_input = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    with stack.client() as client:
        _, (response,) = run(stack, client, jpeg, left_half_mask(original.size), seed=4)
    output = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    kept = slice(600 + FEATHER, None)
    assert np.array_equal(output[:, kept], decoded_input[:, kept])
    # Inside the mask the edit changed the photo.
    assert np.abs(output[:, :590].astype(int) - decoded_input[:, :590]).mean() > 10


@pytest.mark.parametrize(
    "fmt,ctype,pillow", [("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")]
)
def test_lossy_outputs_decode_at_the_right_size(stack, fmt, ctype, pillow):
    with stack.client() as client:
        done, responses = run(
            stack,
            client,
            encoded(photo((900, 600)), "PNG"),
            output_format=fmt,
            output_quality=80,
            num_outputs=2,
        )
    for index, response in enumerate(responses):
        assert response.headers["content-type"] == ctype
        extension = "jpg" if fmt == "jpeg" else fmt
        assert (
            f'filename="{done["id"]}-{index}.{extension}"'
            in response.headers["content-disposition"]
        )
        image = Image.open(io.BytesIO(response.content))
        assert image.format == pillow and image.size == (900, 600)


def test_output_size_model_is_the_bucket(stack):
    with stack.client() as client:
        _, (response,) = run(stack, client, encoded(photo(), "JPEG"), output_size="model")
    # The tiny model's 128 px budget: 1200x800 (3:2) is nearest its square bucket.
    assert Image.open(io.BytesIO(response.content)).size == (128, 128)


def test_a_display_p3_photo_is_converted_to_srgb(stack):
    p3 = display_p3()
    original = photo((400, 300), seed=2)
    png = encoded(original, "PNG", icc_profile=p3)
    expected = ImageCms.profileToProfile(
        original,
        ImageCms.ImageCmsProfile(io.BytesIO(p3)),
        ImageCms.createProfile("sRGB"),
        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
        flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
    )
    with stack.client() as client:
        _, (response,) = run(stack, client, png, left_half_mask((400, 300)))
    output = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    kept = slice(200 + FEATHER, None)
    assert np.array_equal(output[:, kept], np.asarray(expected)[:, kept])
    # ...and the conversion did something: untagged pixels differ.
    assert not np.array_equal(output[:, kept], np.asarray(original)[:, kept])


def test_a_heic_photo_works(stack):
    buf = io.BytesIO()
    pillow_heif.from_pillow(photo((480, 360), seed=3)).save(buf, format="HEIF", quality=90)
    with stack.client() as client:
        _, (response,) = run(stack, client, buf.getvalue())
    assert Image.open(io.BytesIO(response.content)).size == (480, 360)
