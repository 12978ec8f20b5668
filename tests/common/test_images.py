import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from services.common.images import MAX_PIXELS, ImageRejected, decode_image, to_model_input
from tests.conftest import image_bytes


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels: all a size check may read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def mpo_bytes() -> bytes:
    """A multi-picture JPEG as phones write it: the photo first, then a second picture."""
    photo = Image.new("RGB", (64, 48), (255, 0, 0))
    photo.putpixel((0, 0), (0, 255, 0))
    second = Image.new("RGB", (32, 24), (0, 0, 255))
    buf = io.BytesIO()
    photo.save(buf, format="MPO", save_all=True, append_images=[second], quality=95)
    return buf.getvalue()


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


def test_multi_picture_jpeg_is_accepted_as_its_first_picture():
    data = mpo_bytes()
    assert Image.open(io.BytesIO(data)).format == "MPO"  # what phones' files look like
    decoded = decode_image(data)
    assert decoded.content_type == "image/jpeg"
    out = np.asarray(to_model_input(decoded.image, 512))
    assert out.shape == (48, 64, 3)
    assert out[24, 32, 0] > 200 and out[24, 32, 2] < 60  # the red photo, not the blue one


@pytest.mark.parametrize(
    "size",
    [
        (8000, 7000),  # over our limit only
        (10000, 10000),  # over Pillow's warning threshold too
        (20000, 10000),  # over Pillow's hard limit, which open() itself raises
    ],
)
def test_too_many_pixels_is_image_too_large_whatever_the_size(size):
    data = png_header(*size)
    assert size[0] * size[1] > MAX_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no decompression bomb warning leaks either
        with pytest.raises(ImageRejected) as info:
            decode_image(data)
    assert info.value.code == "image_too_large"
    assert str(MAX_PIXELS) in info.value.message


def test_size_check_reads_the_declared_size():
    # The header-only images above are rejected by size, not for lacking pixel data.
    with pytest.raises(ImageRejected) as info:
        decode_image(png_header(64, 48))
    assert info.value.code == "corrupt_image"
