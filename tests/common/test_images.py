import io

import numpy as np
import pytest
from PIL import Image

from services.common.images import ImageRejected, decode_image, to_model_input
from tests.conftest import image_bytes


def _exif_rotated_jpeg() -> bytes:
    # Stored 80 wide x 40 high, with EXIF orientation 6: "rotate 90° clockwise to view".
    image = Image.new("RGB", (80, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 40, 40))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    decoded = decode_image(_exif_rotated_jpeg())
    out = to_model_input(decoded.image, max_side=512)
    assert out.size == (40, 80)  # upright: now portrait
    pixels = np.asarray(out)
    # Rotated clockwise, the stored left half (red) becomes the top half.
    assert pixels[5, 20, 0] > 200 and pixels[5, 20, 2] < 60
    assert pixels[75, 20, 2] > 200 and pixels[75, 20, 0] < 60


@pytest.mark.parametrize(
    "mode,fmt,save",
    [
        ("RGBA", "PNG", {}),
        ("L", "PNG", {}),
        ("P", "PNG", {}),
        ("CMYK", "JPEG", {}),
        ("LA", "PNG", {}),
    ],
)
def test_modes_become_rgb(mode, fmt, save):
    out = to_model_input(decode_image(image_bytes((64, 64), mode, fmt, **save)).image, 512)
    assert out.mode == "RGB"
    assert out.size == (64, 64)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    out = np.asarray(to_model_input(decode_image(buf.getvalue()).image, 512))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[8, 8]) == (255, 255, 255)


@pytest.mark.parametrize(
    "size,max_side,expected",
    [
        ((1000, 750), 512, (512, 384)),
        ((750, 1000), 512, (384, 512)),
        ((333, 517), 512, (328, 512)),
        ((101, 67), 512, (96, 64)),
        ((64, 64), 512, (64, 64)),
        ((4000, 10), 512, (512, 8)),
    ],
)
def test_resized_to_max_side_and_multiples_of_8(size, max_side, expected):
    out = to_model_input(Image.new("RGB", size), max_side)
    assert out.size == expected
    assert out.width % 8 == 0 and out.height % 8 == 0
    assert max(out.size) <= max_side


def test_small_images_are_not_upscaled():
    assert to_model_input(Image.new("RGB", (40, 24)), 512).size == (40, 24)


@pytest.mark.parametrize(
    "data,code",
    [
        (b"", "empty_image"),
        (b"this is a text file, not a picture", "not_an_image"),
        (image_bytes(fmt="GIF", mode="P"), "unsupported_image_format"),
        (image_bytes(fmt="BMP"), "unsupported_image_format"),
        (image_bytes((256, 256), fmt="PNG")[:200], "corrupt_image"),
        (image_bytes((256, 256), fmt="JPEG")[:400], "corrupt_image"),
    ],
)
def test_bad_images_are_rejected_with_a_reason(data, code):
    with pytest.raises(ImageRejected) as info:
        decode_image(data)
    assert info.value.code == code
    assert info.value.message


@pytest.mark.parametrize(
    "fmt,content_type", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")]
)
def test_accepted_formats(fmt, content_type):
    decoded = decode_image(image_bytes(fmt=fmt))
    assert decoded.content_type == content_type


def test_upright_size_predicts_model_input_size_without_decoding_twice():
    from services.common.images import model_input_size, upright_size

    decoded = decode_image(_exif_rotated_jpeg())
    assert upright_size(decoded.image) == (40, 80)
    assert (
        model_input_size(*upright_size(decoded.image), 512)
        == to_model_input(decoded.image, 512).size
    )
