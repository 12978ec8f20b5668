import io
import logging
import random
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zlib
from enum import StrEnum

import numpy as np
import pillow_heif
import pytest
from PIL import ExifTags, Image, ImageCms

from services.common import images
from services.common.images import (
    ACCEPTED_FORMATS,
    MAX_PIXELS,
    OUTPUT_FORMATS,
    SRGB_ICC_PROFILE,
    ImageRejected,
    decode_image,
    encode_output,
    prepare_input,
    prepare_mask,
)
from tests.common import icc_profiles
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
    out = prepare_input(decoded.image)
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
    out = prepare_input(decode_image(image_bytes((64, 64), mode, fmt, **save)).image)
    assert out.mode == "RGB"
    assert out.size == (64, 64)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    out = np.asarray(prepare_input(decode_image(buf.getvalue()).image))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[8, 8]) == (255, 255, 255)


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
    "fmt,content_type",
    [
        ("JPEG", "image/jpeg"),
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
        ("HEIF", "image/heif"),
        ("AVIF", "image/avif"),
    ],
)
def test_accepted_formats(fmt, content_type):
    decoded = decode_image(image_bytes(fmt=fmt))
    assert decoded.content_type == content_type


def test_upright_size_predicts_the_prepared_size_without_transposing():
    from services.common.images import upright_size

    decoded = decode_image(_exif_rotated_jpeg())
    assert upright_size(decoded.image) == (40, 80) == prepare_input(decoded.image).size


def test_multi_picture_jpeg_is_accepted_as_its_first_picture():
    data = mpo_bytes()
    assert Image.open(io.BytesIO(data)).format == "MPO"  # what phones' files look like
    decoded = decode_image(data)
    assert decoded.content_type == "image/jpeg"
    out = np.asarray(prepare_input(decoded.image))
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


# --- Helpers for the colour-management, output and mask tests ---------------------------

SRGB = ImageCms.createProfile("sRGB")
INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC
BPC = ImageCms.Flags.BLACKPOINTCOMPENSATION


def encode(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int32)


def patches(colors, size=16) -> Image.Image:
    """A row of flat squares, one per colour, so lossy codecs keep each colour's centre."""
    image = Image.new("RGB", (size * len(colors), size))
    for i, color in enumerate(colors):
        image.paste(color, (i * size, 0, (i + 1) * size, size))
    return image


def centres(image: Image.Image, count: int, size=16) -> list[tuple[int, ...]]:
    return [image.getpixel((i * size + size // 2, size // 2)) for i in range(count)]


def png16(values: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written chunk by chunk: Pillow cannot write 16-bit RGB or gray+alpha.

    color_type: 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    height, width = values.shape[:2]
    rows = values.astype(">u2").reshape(height, width, -1)
    raw = b"".join(b"\0" + rows[y].tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def photo_like(size=(256, 192), seed=0) -> Image.Image:
    """Smooth shading, hard-edged shapes and sensor noise: compresses like a photo."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    values = np.stack([128 + 80 * np.sin(x / 40 + c) * np.cos(y / 30 - c) for c in range(3)], -1)
    for _ in range(8):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, 60)
        inside = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        values[inside] = values[inside] * 0.3 + rng.uniform(0, 255, 3) * 0.7
    values += rng.normal(0, 3, values.shape)
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))


# --- HEIF/HEIC and AVIF input -------------------------------------------------------------

QUADRANT_COLORS = [(220, 40, 40), (40, 200, 60), (30, 60, 210), (240, 240, 240)]


def quadrants(size=(64, 48)) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size)
    boxes = [
        (0, 0, width // 2, height // 2),
        (width // 2, 0, width, height // 2),
        (0, height // 2, width // 2, height),
        (width // 2, height // 2, width, height),
    ]
    for box, color in zip(boxes, QUADRANT_COLORS, strict=True):
        image.paste(color, box)
    return image


def assert_quadrants(image: Image.Image, tolerance: int) -> None:
    width, height = image.size
    points = [(w * width // 4, h * height // 4) for h in (1, 3) for w in (1, 3)]
    for point, expected in zip(points, QUADRANT_COLORS, strict=True):
        got = np.array(image.getpixel(point))
        assert np.abs(got - expected).max() <= tolerance, (point, tuple(got), expected)


def heic_bytes(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    pillow_heif.from_pillow(image).save(buf, format="HEIF", quality=-1, **save)  # lossless
    return buf.getvalue()


def test_heic_from_a_phone_decodes_with_its_size_and_colours():
    data = heic_bytes(quadrants())
    assert Image.open(io.BytesIO(data)).format == "HEIF"  # what a .heic file reports
    decoded = decode_image(data)
    assert decoded.format == "HEIF"
    assert decoded.content_type == "image/heif"
    out = prepare_input(decoded.image)
    assert (out.mode, out.size) == ("RGB", (64, 48))
    assert_quadrants(out, tolerance=6)  # lossless HEVC, but YCbCr 4:2:0 rounds a little


def test_avif_decodes_with_its_size_and_colours():
    data = encode(quadrants(), "AVIF", quality=95)
    decoded = decode_image(data)
    assert decoded.format == "AVIF"
    assert decoded.content_type == "image/avif"
    out = prepare_input(decoded.image)
    assert (out.mode, out.size) == ("RGB", (64, 48))
    assert_quadrants(out, tolerance=8)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_phone_photo_with_a_display_p3_profile_is_converted(fmt):
    color = (180, 90, 60)
    p3 = icc_profiles.display_p3()
    if fmt == "HEIF":
        data = heic_bytes(patches([color]), icc_profile=p3)
    else:
        data = encode(patches([color]), "AVIF", quality=95, icc_profile=p3)
    decoded = decode_image(data)
    assert decoded.image.info["icc_profile"] == p3
    r, g, b = centres(prepare_input(decoded.image), 1)[0]
    # Display P3 (180, 90, 60) is sRGB (193, 83, 51): more saturated than read untagged.
    assert abs(r - 193) <= 4 and abs(g - 83) <= 4 and abs(b - 51) <= 4


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_cut_off_heif_and_avif_are_corrupt_not_unknown(fmt):
    data = encode(photo_like(), fmt, quality=80)
    for cut in (len(data) // 2, int(len(data) * 0.9)):
        with pytest.raises(ImageRejected) as info:
            decode_image(data[:cut])
        assert info.value.code == "corrupt_image"


def test_other_iso_media_files_are_not_images():
    mp4 = struct.pack(">I", 24) + b"ftypisom" + b"\0\0\2\0" + b"isommp41" + b"\0" * 64
    with pytest.raises(ImageRejected) as info:
        decode_image(mp4)
    assert info.value.code == "not_an_image"


def test_unsupported_format_message_lists_every_accepted_format():
    with pytest.raises(ImageRejected) as info:
        decode_image(image_bytes(fmt="GIF", mode="P"))
    assert "GIF" in info.value.message
    for fmt in ACCEPTED_FORMATS:
        assert fmt in info.value.message
    assert "HEIF" in info.value.message and "AVIF" in info.value.message


# --- prepare_input: upright, 8-bit ----------------------------------------------------------


def test_prepare_input_applies_exif_orientation():
    out = prepare_input(decode_image(_exif_rotated_jpeg()).image)
    assert (out.mode, out.size) == ("RGB", (40, 80))
    values = pixels(out)
    assert values[5, 20, 0] > 200 and values[5, 20, 2] < 60  # the stored left half, on top
    assert values[75, 20, 2] > 200 and values[75, 20, 0] < 60


def test_prepare_input_keeps_the_full_size():
    image = photo_like((1031, 517))
    out = prepare_input(decode_image(encode(image, "PNG")).image)
    assert out.size == (1031, 517)
    assert np.array_equal(pixels(out), pixels(image))  # untagged 8-bit RGB: untouched


def test_16_bit_grayscale_png_is_scaled_not_clipped():
    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))
    data = encode(Image.fromarray(gradient), "PNG")
    decoded = decode_image(data)
    assert decoded.image.mode == "I;16"  # how Pillow 13 opens it
    out = pixels(prepare_input(decoded.image))
    assert out.shape == (8, 256, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    row = out[0, :, 0]
    assert row.min() == 0 and row.max() == 255
    assert abs(row.mean() - 127.5) < 1
    assert np.all(np.diff(row) >= 0)  # tracks the gradient
    assert np.abs(row - np.round(gradient[0] / 257)).max() == 0  # exact 16 -> 8 bit rescale
    # What the model used to get: nearly everything white.
    assert pixels(decoded.image.convert("RGB")).mean() > 250


def test_16_bit_grayscale_png_with_a_transparent_value_goes_on_white():
    values = np.array([[0, 1000, 30000, 65535]], dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(values), "PNG", transparency=1000))
    out = pixels(prepare_input(decoded.image))[0, :, 0]
    assert out.tolist() == [0, 255, round(30000 / 257), 255]


def test_16_bit_rgb_and_gray_alpha_pngs_are_scaled_by_pillow():
    ramp = np.linspace(0, 65535, 8)
    rgb = np.zeros((2, 8, 3))
    rgb[..., 0] = ramp
    rgb[..., 2] = 65535 - ramp
    decoded = decode_image(png16(rgb, color_type=2))
    assert decoded.image.mode == "RGB"  # Pillow 13 already reduces 16-bit RGB to 8 bits
    out = pixels(prepare_input(decoded.image))
    expected = np.round(ramp / 257)
    assert np.abs(out[0, :, 0] - expected).max() <= 1
    assert np.abs(out[0, :, 2] - (255 - expected)).max() <= 1

    gray_alpha = np.zeros((2, 8, 2))
    gray_alpha[..., 0] = ramp
    gray_alpha[..., 1] = 65535
    gray_alpha[:, 0, 1] = 0  # the first column is transparent
    decoded = decode_image(png16(gray_alpha, color_type=4))
    assert decoded.image.mode == "RGBA"
    out = pixels(prepare_input(decoded.image))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert np.abs(out[0, 1:, 1] - expected[1:]).max() <= 1


def test_32_bit_modes_are_scaled():
    wide = Image.fromarray(np.array([[0, 257, 32896, 65535, 70000, -5]], dtype=np.int32))
    assert wide.mode == "I"
    assert pixels(prepare_input(wide))[0, :, 0].tolist() == [0, 1, 128, 255, 255, 0]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 1.5, -1.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert pixels(prepare_input(floats))[0, :, 0].tolist() == [0, 128, 255, 255, 0]


@pytest.mark.parametrize(
    "image,expected",
    [
        (Image.new("L", (8, 8), 77), (77, 77, 77)),
        (Image.new("1", (8, 8), 1), (255, 255, 255)),
        (Image.new("RGB", (8, 8), (10, 20, 30)).quantize(4), (10, 20, 30)),
        (Image.new("LA", (8, 8), (77, 255)), (77, 77, 77)),
        (Image.new("LA", (8, 8), (77, 0)), (255, 255, 255)),
        (Image.new("RGBA", (8, 8), (10, 20, 30, 0)), (255, 255, 255)),
        (Image.new("RGBA", (8, 8), (10, 20, 30, 255)), (10, 20, 30)),
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
    ],
    ids=["L", "1", "P", "LA opaque", "LA transparent", "RGBA clear", "RGBA opaque", "CMYK"],
)
def test_modes_become_8_bit_rgb(image, expected):
    out = prepare_input(image)
    assert (out.mode, out.size) == ("RGB", (8, 8))
    assert out.getpixel((4, 4)) == expected


def test_half_transparent_pixels_blend_with_white():
    out = prepare_input(Image.new("RGBA", (4, 4), (0, 0, 0, 128)))
    assert out.getpixel((0, 0)) == (127, 127, 127)


def test_palette_with_a_transparent_entry_goes_on_white():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 10, 10])
    image.putpixel((0, 0), 0)
    decoded = decode_image(encode(image, "PNG", transparency=0))
    out = prepare_input(decoded.image)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((2, 2)) == (200, 10, 10)


# --- prepare_input: ICC profiles to sRGB ---------------------------------------------------

P3_COLORS = [(255, 0, 0), (0, 255, 0), (180, 90, 60), (128, 128, 128), (40, 160, 220)]


def tagged_png(image: Image.Image, profile: bytes) -> Image.Image:
    decoded = decode_image(encode(image, "PNG", icc_profile=profile))
    assert decoded.image.info["icc_profile"] == profile
    return decoded.image


def expected_conversion(image: Image.Image, profile: bytes) -> Image.Image:
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    return ImageCms.profileToProfile(
        image, source, SRGB, renderingIntent=INTENT, outputMode="RGB", flags=BPC
    )


def test_profiles_built_for_the_tests_are_valid():
    for make, space in [
        (icc_profiles.display_p3, "RGB"),
        (icc_profiles.adobe_rgb, "RGB"),
        (icc_profiles.gray_gamma22, "GRAY"),
        (icc_profiles.naive_cmyk, "CMYK"),
    ]:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(make()))
        assert profile.profile.xcolor_space.strip() == space
        assert "(test)" in ImageCms.getProfileDescription(profile)


def test_display_p3_is_converted_to_srgb():
    image = patches(P3_COLORS)
    tagged = tagged_png(image, icc_profiles.display_p3())
    out = prepare_input(tagged)
    assert (out.mode, out.size) == ("RGB", image.size)
    # Exactly what littlecms gives for P3 -> sRGB, relative colorimetric with BPC.
    assert np.array_equal(
        pixels(out), pixels(expected_conversion(tagged, icc_profiles.display_p3()))
    )
    red, green, orange, gray, blue = centres(out, len(P3_COLORS))
    # P3's red and green lie outside sRGB: clipped to sRGB's most saturated red and green.
    assert red[0] == 255 and red[1] <= 10 and red[2] <= 10
    assert green[1] == 255 and green[0] <= 10 and green[2] <= 10
    # An in-gamut orange gets more saturated than if its numbers were read as sRGB.
    assert orange[0] > 180 + 8 and orange[2] < 60 - 5
    assert abs(orange[0] - 193) <= 1 and abs(orange[1] - 83) <= 1 and abs(orange[2] - 51) <= 1
    assert gray == (128, 128, 128)  # P3 and sRGB share white point and tone curve
    assert blue != (40, 160, 220)


def test_adobe_rgb_jpeg_from_a_camera_is_converted_to_srgb():
    colors = [(0, 255, 0), (100, 150, 100), (180, 90, 60), (255, 255, 255), (0, 0, 0)]
    data = encode(patches(colors), "JPEG", quality=95, icc_profile=icc_profiles.adobe_rgb())
    decoded = decode_image(data)
    out = prepare_input(decoded.image)
    expected = expected_conversion(decoded.image, icc_profiles.adobe_rgb())
    assert np.array_equal(pixels(out), pixels(expected))
    green, sage, orange, white, black = centres(out, len(colors))
    assert green[1] >= 250 and green[0] <= 10 and green[2] <= 10  # clipped to sRGB green
    assert orange[0] > 180 + 15  # Adobe RGB's red primary is sRGB's, its gamma is not
    assert sage != centres(decoded.image, len(colors))[1]
    assert min(white) >= 253 and max(black) <= 2  # white stays white, black stays black


def test_gray_profile_is_converted_to_srgb():
    image = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (4, 1)))
    tagged = tagged_png(image, icc_profiles.gray_gamma22())
    out = prepare_input(tagged)
    assert out.mode == "RGB"
    assert np.array_equal(
        pixels(out), pixels(expected_conversion(tagged, icc_profiles.gray_gamma22()))
    )
    row = pixels(out)[0, :, 0]
    assert row[0] == 0 and row[255] == 255 and row[64] != 64  # gamma 2.2 is not sRGB's curve


def test_cmyk_jpeg_with_its_profile_is_converted_through_the_profile():
    profile = icc_profiles.naive_cmyk()
    inks = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 128), (40, 200, 90, 10)]
    image = Image.new("CMYK", (16 * len(inks), 16))
    for i, ink in enumerate(inks):
        image.paste(ink, (i * 16, 0, (i + 1) * 16, 16))
    decoded = decode_image(encode(image, "JPEG", quality=95, icc_profile=profile))
    assert decoded.image.mode == "CMYK"
    out = prepare_input(decoded.image)
    assert out.mode == "RGB"
    assert np.array_equal(pixels(out), pixels(expected_conversion(decoded.image, profile)))
    paper, cyan, black, half_black, mix = centres(out, len(inks))
    plain = centres(decoded.image.convert("RGB"), len(inks))
    assert min(paper) >= 252 and min(cyan[1:]) >= 250
    # The press's black is a dark grey (sRGB ~31); black point compensation maps it, and
    # the darkest cyan, to sRGB black so shadows keep their depth.
    assert max(black) <= 3 and cyan[0] <= 3
    # The profile's dot gain prints 50% black darker (sRGB ~103); the plain formula says 127.
    assert abs(half_black[0] - 103) <= 3 and abs(plain[3][0] - 127) <= 3
    assert np.abs(np.array(mix) - plain[4]).max() > 20


def test_cmyk_jpeg_without_a_profile_gets_pillows_conversion():
    image = Image.new("CMYK", (32, 16), (0, 0, 0, 128))
    image.paste((255, 0, 0, 0), (16, 0, 32, 16))
    decoded = decode_image(encode(image, "JPEG", quality=95))
    assert "icc_profile" not in decoded.image.info
    out = prepare_input(decoded.image)
    assert np.array_equal(pixels(out), pixels(decoded.image.convert("RGB")))
    assert abs(out.getpixel((8, 8))[0] - 127) <= 3
    assert out.getpixel((24, 8))[0] <= 5


def test_transparent_pixels_of_a_tagged_image_go_on_srgb_white():
    image = Image.new("RGBA", (32, 16), (0, 0, 0, 0))
    image.paste((180, 90, 60, 255), (16, 0, 32, 16))
    tagged = tagged_png(image, icc_profiles.display_p3())
    out = prepare_input(tagged)
    assert out.getpixel((8, 8)) == (255, 255, 255)
    expected = expected_conversion(
        Image.new("RGB", (1, 1), (180, 90, 60)), icc_profiles.display_p3()
    )
    assert out.getpixel((24, 8)) == expected.getpixel((0, 0))


@pytest.mark.parametrize(
    "profile",
    [
        b"this is not an ICC profile",
        icc_profiles.display_p3()[:200],  # truncated
        icc_profiles.naive_cmyk(),  # a CMYK profile on RGB pixels
        icc_profiles.gray_gamma22(),  # a gray profile on RGB pixels
    ],
    ids=["garbage", "truncated", "cmyk-on-rgb", "gray-on-rgb"],
)
def test_unusable_profile_is_ignored_with_a_warning(profile, caplog):
    image = patches(P3_COLORS)
    tagged = decode_image(encode(image, "PNG", icc_profile=profile)).image
    with caplog.at_level(logging.WARNING, logger="services.common.images"):
        out = prepare_input(tagged)
    assert np.array_equal(pixels(out), pixels(image))  # read as sRGB, as if untagged
    assert any("ICC profile" in record.getMessage() for record in caplog.records)


def test_srgb_tagged_image_is_unchanged():
    image = photo_like()
    tagged = tagged_png(image, SRGB_ICC_PROFILE)
    assert np.array_equal(pixels(prepare_input(tagged)), pixels(image))


def test_transforms_are_built_once_per_profile_and_mode():
    images._srgb_transform.cache_clear()
    for _ in range(3):
        # Fresh bytes objects each time: the cache key is the digest, not the object.
        prepare_input(tagged_png(patches(P3_COLORS), bytes(icc_profiles.display_p3())))
    prepare_input(tagged_png(Image.new("L", (4, 4)), icc_profiles.display_p3()))
    info = images._srgb_transform.cache_info()
    assert (info.misses, info.hits) == (2, 2)  # RGB and L pixels are two transforms


# --- encode_output -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_outputs_round_trip_tagged_as_srgb(fmt):
    image = photo_like((203, 151))
    data = encode_output(image, fmt, quality=90)
    decoded = decode_image(data)
    spec = OUTPUT_FORMATS[fmt]
    assert decoded.format == spec.pillow_format
    assert decoded.content_type == spec.content_type
    assert (decoded.image.mode, decoded.image.size) == ("RGB", (203, 151))
    icc = decoded.image.info["icc_profile"]
    assert icc == SRGB_ICC_PROFILE
    assert "sRGB" in ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc)))
    error = np.abs(pixels(prepare_input(decoded.image)) - pixels(image))
    if fmt == "png":
        assert error.max() == 0  # lossless, and re-reading our sRGB tag changes nothing
    else:
        assert error.mean() < 6


def test_output_formats_name_content_types_and_extensions():
    assert {
        name: (f.pillow_format, f.content_type, f.extension) for name, f in OUTPUT_FORMATS.items()
    } == {
        "png": ("PNG", "image/png", "png"),
        "jpeg": ("JPEG", "image/jpeg", "jpg"),
        "webp": ("WEBP", "image/webp", "webp"),
    }


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_higher_quality_makes_bigger_files(fmt):
    image = photo_like()
    sizes = [len(encode_output(image, fmt, quality)) for quality in (10, 30, 50, 70, 85, 95)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes


def test_format_may_be_a_str_enum():
    class Format(StrEnum):
        webp = "webp"

    data = encode_output(Image.new("RGB", (8, 8), (10, 200, 30)), Format.webp, 80)
    assert decode_image(data).format == "WEBP"
    assert OUTPUT_FORMATS[Format.webp].content_type == "image/webp"


def test_png_ignores_quality():
    image = photo_like()
    assert encode_output(image, "png", 10) == encode_output(image, "png", 95)


def test_jpeg_keeps_full_colour_resolution_from_quality_90():
    from PIL import JpegImagePlugin

    image = photo_like()
    for quality, sampling in [(85, 2), (89, 2), (90, 0), (95, 0)]:  # 2 = 4:2:0, 0 = 4:4:4
        decoded = Image.open(io.BytesIO(encode_output(image, "jpeg", quality)))
        assert JpegImagePlugin.get_sampling(decoded) == sampling, quality


@pytest.mark.parametrize(
    "image,fmt,quality",
    [
        (Image.new("RGB", (8, 8)), "gif", 90),
        (Image.new("RGB", (8, 8)), "JPEG", 90),
        (Image.new("RGB", (8, 8)), "jpeg", 0),
        (Image.new("RGB", (8, 8)), "webp", 101),
        (Image.new("RGBA", (8, 8)), "png", 90),
    ],
)
def test_encode_output_rejects_what_it_cannot_do(image, fmt, quality):
    with pytest.raises(ValueError):
        encode_output(image, fmt, quality)


# --- prepare_mask --------------------------------------------------------------------------


def mask_png(array: np.ndarray) -> bytes:
    return encode(Image.fromarray(array.astype(np.uint8)), "PNG")


def assert_binary(mask: Image.Image) -> np.ndarray:
    assert mask.mode == "L"
    values = np.asarray(mask)
    assert set(np.unique(values).tolist()) <= {0, 255}
    return values


def test_mask_is_resized_to_the_image():
    small = np.zeros((24, 32), dtype=np.uint8)
    small[:, :16] = 255  # left half may change
    mask = prepare_mask(mask_png(small), (64, 48), invert=False)
    assert mask.size == (64, 48)
    values = assert_binary(mask)
    assert values[:, :31].min() == 255 and values[:, 33:].max() == 0


def test_mask_is_binarised_at_128():
    gradient = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    values = assert_binary(prepare_mask(mask_png(gradient), (256, 4), invert=False))
    assert values[0, :128].max() == 0 and values[0, 128:].min() == 255


def test_mask_can_be_inverted():
    array = np.zeros((8, 8), dtype=np.uint8)
    array[:, :4] = 255
    values = assert_binary(prepare_mask(mask_png(array), (8, 8), invert=True))
    assert values[:, :4].max() == 0 and values[:, 4:].min() == 255


@pytest.mark.parametrize(
    "fill,invert", [(0, False), (255, True), (100, False)], ids=["black", "white-inverted", "dark"]
)
def test_mask_that_changes_nothing_is_rejected(fill, invert):
    with pytest.raises(ImageRejected) as info:
        prepare_mask(mask_png(np.full((16, 16), fill)), (16, 16), invert=invert)
    assert info.value.code == "mask_empty"
    assert "all black" in info.value.message and "white" in info.value.message


def test_transparent_parts_of_a_mask_mean_keep():
    # A white brush stroke on a transparent layer, as image editors export it.
    array = np.zeros((16, 16, 4), dtype=np.uint8)
    array[4:8, :, :] = (255, 255, 255, 255)  # the stroke
    array[8:12, :, :] = (255, 255, 255, 0)  # white but fully transparent: not painted
    array[12:, :, :] = (255, 255, 255, 100)  # faint brush edge: below the threshold
    array[:2, :, :] = (255, 255, 255, 200)  # mostly opaque brush edge: above it
    mask = prepare_mask(encode(Image.fromarray(array), "PNG"), (16, 16), invert=False)
    values = assert_binary(mask)
    assert values[4:8].min() == 255 and values[:2].min() == 255
    assert values[2:4].max() == 0 and values[8:].max() == 0


def test_opaque_rgba_mask_is_read_by_its_colour():
    array = np.full((8, 8, 4), 255, dtype=np.uint8)
    array[:, :4, :3] = 0  # left half black, everything opaque
    values = assert_binary(prepare_mask(encode(Image.fromarray(array), "PNG"), (8, 8), False))
    assert values[:, :4].max() == 0 and values[:, 4:].min() == 255


def test_jpeg_mask_with_compression_noise_binarises_cleanly():
    array = np.zeros((64, 96), dtype=np.uint8)
    array[16:48, 24:72] = 255
    rng = np.random.default_rng(1)
    noisy = np.clip(array.astype(np.int32) + rng.normal(0, 20, array.shape), 0, 255)
    data = encode(Image.fromarray(noisy.astype(np.uint8)), "JPEG", quality=40)
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    assert len(np.unique(decoded)) > 50  # the JPEG really is noisy
    values = assert_binary(prepare_mask(data, (96, 64), invert=False))
    assert np.array_equal(values, array)


def test_color_jpeg_mask_is_read_by_its_luminance():
    array = np.zeros((32, 32, 3), dtype=np.uint8)
    array[:, 16:] = (255, 255, 255)
    data = encode(Image.fromarray(array), "JPEG", quality=70)
    values = assert_binary(prepare_mask(data, (32, 32), invert=False))
    assert values[:, :15].max() == 0 and values[:, 17:].min() == 255


def test_mask_exif_orientation_is_applied_before_resizing():
    stored = Image.new("L", (80, 40), 0)
    stored.paste(255, (0, 0, 40, 40))  # left half white; orientation 6 puts it on top
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif)
    values = assert_binary(prepare_mask(data, (40, 80), invert=False))
    assert values[:38].min() == 255 and values[42:].max() == 0


def test_16_bit_mask_is_thresholded_at_half_scale():
    values16 = np.tile(np.array([0, 30000, 33000, 65535], dtype=np.uint16), (4, 1))
    values = assert_binary(prepare_mask(encode(Image.fromarray(values16), "PNG"), (4, 4), False))
    assert values[0].tolist() == [0, 0, 255, 255]


@pytest.mark.parametrize(
    "data,code",
    [
        (b"", "empty_image"),
        (b"not a mask", "not_an_image"),
        (image_bytes((256, 256), mode="L", fmt="PNG")[:200], "corrupt_image"),
        (image_bytes(fmt="GIF", mode="P"), "unsupported_image_format"),
    ],
)
def test_bad_mask_files_are_rejected_like_images(data, code):
    with pytest.raises(ImageRejected) as info:
        prepare_mask(data, (64, 48), invert=False)
    assert info.value.code == code


# --- The API's check: no full-size pixels; truncated JPEGs ------------------------------


def _scan_start(data: bytes) -> int:
    """Where the first scan's entropy-coded data begins."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")


def big_flat_jpeg(size=(7000, 7000)) -> bytes:
    return encode(Image.new("RGB", size, (120, 130, 140)), "JPEG", quality=80)


def test_upload_check_decodes_a_large_jpeg_at_an_eighth_of_its_size(decoded_sizes):
    data = big_flat_jpeg()
    loaded = decoded_sizes
    checked = images.check_image_upload(data)
    # Every decode it ran was at 1/8 scale: 875x875 pixels held, not 7000x7000.
    assert loaded and all(w <= 875 and h <= 875 for w, h in loaded)
    # What the route needs comes from the header: full size, format, EXIF.
    assert checked.image.size == (7000, 7000) and checked.content_type == "image/jpeg"
    # The worker's decode is the full one.
    loaded.clear()
    assert decode_image(data).image.size == (7000, 7000)
    assert loaded == [(7000, 7000)]


def test_upload_check_rejects_what_the_full_decode_rejects():
    for data, code in [
        (b"", "empty_image"),
        (b"not a picture", "not_an_image"),
        (image_bytes(fmt="GIF", mode="P"), "unsupported_image_format"),
        (png_header(8000, 7000), "image_too_large"),
        (png_header(64, 48), "corrupt_image"),
        (image_bytes((256, 256), fmt="PNG")[:200], "corrupt_image"),
        (image_bytes((256, 256), fmt="JPEG")[:400], "corrupt_image"),
    ]:
        with pytest.raises(ImageRejected) as info:
            images.check_image_upload(data)
        assert info.value.code == code, data[:20]
    for fmt in ("JPEG", "PNG", "WEBP", "HEIF", "AVIF"):
        assert images.check_image_upload(image_bytes(fmt=fmt)).format == fmt


@pytest.mark.parametrize(
    "fmt,save",
    [
        ("JPEG", {"quality": 90}),
        ("JPEG", {"quality": 90, "progressive": True}),
        ("PNG", {}),
        ("WEBP", {}),
    ],
)
@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_cut_off_images_are_corrupt_in_the_api_and_the_worker(fmt, save, fraction):
    data = encode(photo_like((512, 384)), fmt, **save)
    cut = data[: int(len(data) * fraction)]
    for check in (images.check_image_upload, decode_image):
        with pytest.raises(ImageRejected) as info:
            check(cut)
        assert info.value.code == "corrupt_image"


def test_jpeg_with_a_few_bytes_of_image_data_for_many_pixels_is_corrupt():
    # A 7000x7000 header, 50 bytes of image data, an end marker: libjpeg paints the rest
    # flat grey and only warns. Every 8x8 block takes at least one bit.
    data = big_flat_jpeg()
    start = _scan_start(data)
    bomb = data[: start + 50] + b"\xff\xd9"
    assert len(bomb) < 1000
    for check in (images.check_image_upload, decode_image):
        with pytest.raises(ImageRejected) as info:
            check(bomb)
        assert info.value.code == "corrupt_image"
        assert "image data" in info.value.message


def test_jpeg_ends_are_checked_on_the_first_picture_only():
    data = encode(photo_like((256, 192)), "JPEG")
    # Trailing bytes after the end marker (some cameras and editors leave them), and the
    # further pictures of an MPO, are not the picture's data.
    for whole in (data, data + b"\x00garbage\xff\xd8", mpo_bytes()):
        assert images.jpeg_incomplete_reason(whole) is None
        images.check_image_upload(whole)
        decode_image(whole)
    # An MPO whose first picture is cut is corrupt even though more data follows.
    first_end = mpo_bytes().index(b"\xff\xd9")
    assert images.jpeg_incomplete_reason(mpo_bytes()[: first_end - 100]) is not None


# --- The API's check of a PNG: its image data inflated a slice at a time -----------------


def adam7_png(pixels: np.ndarray, filter_type: int = 0) -> bytes:
    """An interlaced (Adam7) RGB PNG, which Pillow cannot write."""
    height, width, _ = pixels.shape
    raw = b""
    for x0, y0, dx, dy in images._ADAM7:
        for row in pixels[y0::dy, x0::dx]:
            raw += bytes([filter_type]) + row.tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    idat = chunk(b"IDAT", zlib.compress(raw))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def test_upload_check_of_a_large_png_holds_no_pixels(decoded_sizes, tmp_path):
    size = (7000, 7000)
    data = encode(Image.new("RGB", size, (120, 130, 140)), "PNG", compress_level=1)
    tracemalloc.start()
    try:
        checked = images.check_image_upload(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert checked.image.size == size and checked.content_type == "image/png"
    assert decoded_sizes == []  # Pillow decoded nothing
    assert peak < 16 * 2**20, peak  # slices of the inflated data, not 147 MB of pixels
    # The process as a whole (Pillow's own buffers included) grows by far less than one
    # full-size picture.
    path = tmp_path / "big.png"
    path.write_bytes(data)
    script = (
        "import resource, sys\n"
        "from services.common.images import check_image_upload\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "check_image_upload(data)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    grown_kib = int(subprocess.check_output([sys.executable, "-c", script, str(path)]))
    assert grown_kib * 1024 < size[0] * size[1] * 3 // 8, grown_kib


def test_upload_check_of_a_large_png_still_refuses_a_cut_off_file(decoded_sizes):
    data = encode(Image.new("RGB", (7000, 7000), (120, 130, 140)), "PNG", compress_level=1)
    with pytest.raises(ImageRejected) as info:
        images.check_image_upload(data[: len(data) // 2])
    assert info.value.code == "corrupt_image"


def test_upload_check_reads_interlaced_pngs():
    pixels = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    data = adam7_png(pixels)
    opened = Image.open(io.BytesIO(data))
    assert images.png_stream_accepted(opened, data)
    assert images.check_image_upload(data).image.size == (53, 37)
    assert (np.asarray(decode_image(data).image) == pixels).all()
    with pytest.raises(ImageRejected) as info:
        images.check_image_upload(adam7_png(pixels, filter_type=9))
    assert info.value.code == "corrupt_image"


def _verdict(check, data: bytes) -> str:
    try:
        check(data)
    except ImageRejected as exc:
        return exc.code
    return "accepted"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "adam7"])
def test_upload_check_of_damaged_pngs_agrees_with_the_full_decode(mode):
    pixels = np.random.default_rng(1).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    if mode == "adam7":
        data = adam7_png(pixels)
    else:
        data = encode(Image.fromarray(pixels).convert(mode), "PNG")
    assert images.png_stream_accepted(Image.open(io.BytesIO(data)), data)
    rng = random.Random(mode)
    for _ in range(150):
        damaged = bytearray(data)
        if rng.random() < 0.4:
            damaged = damaged[: rng.randrange(30, len(damaged))]
        else:
            for _ in range(rng.randint(1, 3)):
                damaged[rng.randrange(33, len(damaged))] = rng.randrange(256)
        damaged = bytes(damaged)
        assert _verdict(images.check_image_upload, damaged) == _verdict(decode_image, damaged)
