"""Decoding uploaded images, colour-managing them for the model, and encoding results.

The API checks every upload before accepting it (`check_image_upload`: header checks and,
for JPEG, a decode at 1/8 scale, so that it never holds a full-size picture), and the worker
decodes the stored copy in full (`decode_image`); both reject the same files, so "accepted"
and "processable" mean the same thing.

Everything the model sees and everything we send back is 8-bit sRGB: phones shoot Display
P3, cameras Adobe RGB, print workflows CMYK, and PNG exports may be 16-bit. Reading those
numbers as if they were sRGB shifts colours (or, for 16-bit grayscale, turns the picture
white), so `prepare_input` converts them once, and `encode_output` tags every result as
sRGB so that browsers and catalog tools show the colours we computed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import re
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pillow_heif
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# iPhones save HEIC by default. Pillow reads AVIF itself; pillow-heif adds HEIF/HEIC, which
# Image.open then reports as format "HEIF" whichever brand (heic, heix, mif1) the file has.
pillow_heif.register_heif_opener()

ACCEPTED_FORMATS = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "HEIF": "image/heif",
    "AVIF": "image/avif",
}
# Phones and cameras write multi-picture JPEGs (a depth map or a preview after the photo);
# Pillow names them MPO. The first picture is an ordinary JPEG and the one that is shown.
_FORMAT_ALIASES = {"MPO": "JPEG"}
# Pillow refuses more than ~179 MP by default; a product photo never needs that much and
# decoding it would cost the API gigabytes.
MAX_PIXELS = 50_000_000
# ISO-BMFF brands of HEIF and AVIF files. Their openers need the whole container to
# identify a file, so a cut-off HEIC or AVIF looks like "not an image" to Pillow.
_HEIF_AVIF_BRANDS = frozenset(
    b"heic heix heim heis hevc hevx hevm hevs mif1 mif2 msf1 avif avis".split()
)


class ImageRejected(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image
    format: str

    @property
    def content_type(self) -> str:
        return ACCEPTED_FORMATS[self.format]


def decode_image(data: bytes) -> DecodedImage:
    """Fully decode `data`, or raise ImageRejected naming what is wrong with it."""
    with _rejections(data):
        image, fmt = _open_checked(data)
        # load() decodes every pixel: a cut-off file fails here, not inside the worker.
        image.load()
    return DecodedImage(image=image, format=fmt)


def check_image_upload(data: bytes) -> DecodedImage:
    """Raise ImageRejected for what decode_image would reject, without holding full-size
    pixels: the API's check before it accepts an upload.

    Format, size and pixel limit come from the header. A JPEG is then decoded at 1/8 scale
    (libjpeg still reads all of its data, so a cut-off file fails as it would in full). A
    PNG's image data is inflated a slice at a time and checked as Pillow's decoder checks
    it (`png_stream_accepted`), holding no pixels; only a PNG that check refuses is decoded
    in full, for the exact reason. Other formats have no reduced decode and are decoded in
    full and dropped at once.
    The image returned is opened but not loaded: its size, format and EXIF are there, its
    pixels are not.
    """
    with _rejections(data):
        image, fmt = _open_checked(data)
        if fmt == "PNG" and png_stream_accepted(image, data):
            image.close()
            header, _ = _open_checked(data)
            return DecodedImage(image=header, format=fmt)
        if fmt == "JPEG":
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
        image.close()
        header, _ = _open_checked(data)
    return DecodedImage(image=header, format=fmt)


# --- PNG image data, checked without its pixels ----------------------------------------
# Pillow's PNG decoder (libImaging/ZipDecode.c) reads the IDAT chunks that follow each
# other, inflates them, and refuses the image where the zlib data is broken, where a row
# starts with an unknown filter type, or where the file ends before the last row (or the
# zlib stream's end). It does not look at chunk CRCs, at what follows the image data, nor
# at whether the stream ends after the last row. png_stream_accepted runs those checks on
# the inflated data a slice at a time, the pixels never being unfiltered.

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
# Adam7: each pass's first column and row, and its column and row steps.
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))  # fmt: skip
_PNG_SLICE = 1 << 20  # inflated bytes held at once


def _png_rows(data: bytes, width: int, height: int) -> list[tuple[int, int]] | None:
    """The rows of the PNG's image data, as (row count, bytes per row with its filter
    byte) per interlace pass; None where the header is not one this check knows."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None
    depth, colour, _, _, interlace = data[24:29]
    channels = _PNG_CHANNELS.get(colour)
    if channels is None or depth not in (1, 2, 4, 8, 16) or interlace not in (0, 1):
        return None

    def stride(columns: int) -> int:
        return 1 + (columns * channels * depth + 7) // 8

    if interlace == 0:
        return [(height, stride(width))]
    passes = []
    for x0, y0, dx, dy in _ADAM7:
        columns = (width - x0 + dx - 1) // dx if width > x0 else 0
        rows = (height - y0 + dy - 1) // dy if height > y0 else 0
        if columns and rows:
            passes.append((rows, stride(columns)))
    return passes


def _idat_payloads(data: bytes, start: int) -> Iterator[bytes | None]:
    """The IDAT chunks' data from the chunk at `start` on; None where the file ends
    inside a chunk (truncated)."""
    pos = start
    while True:
        if pos + 8 > len(data):
            yield None
            return
        length = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] != b"IDAT":
            return
        end = pos + 8 + length
        yield data[pos + 8 : min(end, len(data))]
        if end > len(data):
            yield None
            return
        pos = end + 4  # the CRC, which Pillow does not check while decoding


def png_stream_accepted(image: Image.Image, data: bytes) -> bool:
    """Whether Pillow's full decode of the PNG `image` (opened from `data`) would accept
    its image data, found without decoding a pixel: False where it would not, or where
    this check cannot tell (then decode it to know)."""
    rows = _png_rows(data, *image.size)
    if rows is None or len(image.tile) != 1 or image.tile[0][0] != "zip":
        return False
    # Each pass's image data in bytes, and its row length: a filter byte starts each row.
    passes = [(count * stride, stride) for count, stride in rows]
    inflate = zlib.decompressobj()
    done = 0  # bytes of the current pass seen
    for payload in _idat_payloads(data, image.tile[0][2] - 8):
        if payload is None:
            return False  # the file ends in the middle of a chunk
        pending, full = payload, False
        while pending or full:  # full: a slice's worth came out, more may be waiting
            try:
                out = memoryview(inflate.decompress(pending, _PNG_SLICE))
            except zlib.error:
                return False
            pending, full = inflate.unconsumed_tail, len(out) == _PNG_SLICE
            while out:
                size, stride = passes[0]
                part = out[: size - done]
                first = (-done) % stride
                if first < len(part):
                    filters = np.frombuffer(part, np.uint8)[first::stride]
                    if filters.max() > 4:
                        return False
                done += len(part)
                out = out[len(part) :]
                if done == size:
                    passes.pop(0)
                    done = 0
                    if not passes:
                        return True  # every row is there (what follows is not read)
            if inflate.eof:
                return True  # Pillow's decoder stops at the stream's end, rows or not
    return not passes


def _open_checked(data: bytes) -> tuple[Image.Image, str]:
    """`data` opened (header only), with its format and size checked, and its format name."""
    if not data:
        raise ImageRejected("empty_image", "the image file is empty")
    image = Image.open(io.BytesIO(data))
    fmt = _FORMAT_ALIASES.get(image.format, image.format)
    if fmt not in ACCEPTED_FORMATS:
        raise ImageRejected(
            "unsupported_image_format",
            f"image format {fmt} is not supported; send {_accepted_formats_text()}",
        )
    if image.width * image.height > MAX_PIXELS:
        raise _too_large(f"{image.width}x{image.height}")
    if fmt == "JPEG" and (reason := jpeg_incomplete_reason(data)) is not None:
        raise _corrupt(reason)
    return image, fmt


@contextlib.contextmanager
def _rejections(data: bytes) -> Iterator[None]:
    """Pillow's errors while opening or decoding `data` as the ImageRejected they mean."""
    try:
        with warnings.catch_warnings():
            # Pillow warns from ~89 MP on; the pixel limit is stricter and names the size.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageRejected:
        raise
    except Image.DecompressionBombError:
        # open() itself raises this past twice Pillow's limit, before we could see the size.
        raise _too_large(f"over {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels") from None
    except UnidentifiedImageError:
        if _is_heif_or_avif(data):
            raise _corrupt("the HEIF/AVIF container is incomplete") from None
        raise ImageRejected("not_an_image", "the uploaded file is not an image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _corrupt(str(exc)) from None


def _accepted_formats_text() -> str:
    *first, last = ACCEPTED_FORMATS
    return f"{', '.join(first)} or {last}" if first else last


def _too_large(size: str) -> ImageRejected:
    return ImageRejected(
        "image_too_large", f"image is {size}; at most {MAX_PIXELS} pixels are accepted"
    )


def _corrupt(reason: str) -> ImageRejected:
    return ImageRejected(
        "corrupt_image", f"the image could not be decoded (truncated or corrupt): {reason}"
    )


def _is_heif_or_avif(data: bytes) -> bool:
    """Whether `data` opens with the 'ftyp' box of a HEIF or AVIF file."""
    if data[4:8] != b"ftyp" or len(data) < 16:
        return False
    box_end = min(int.from_bytes(data[:4], "big"), len(data))
    # The major brand, then (after a 4-byte minor version) the compatible brands.
    brands = [data[8:12]] + [data[i : i + 4] for i in range(16, box_end - 3, 4)]
    return any(brand in _HEIF_AVIF_BRANDS for brand in brands)


# --- JPEG completeness ------------------------------------------------------------------
# libjpeg treats the end of the data, or a marker, where the image data should go on as a
# recoverable "premature end": it fills the rest of the picture with flat grey and only
# warns, and Pillow passes that over. So JPEG structure is checked here: the first
# picture's markers are walked to its EOI (what follows, an MPO's further pictures or
# trailing bytes, is not looked at), and its scans must carry at least one bit per 8x8
# block, the least any Huffman-coded picture needs (a DC code per block).

# A marker in entropy-coded data: 0xFF followed by neither a stuffed 0x00, a restart
# marker (RST0-7), nor another fill byte.
_SCAN_MARKER = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")
# Markers without a length: TEM, RST0-7, SOI (EOI ends the walk).
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})
# Baseline, extended and progressive Huffman-coded frames: the one-bit-per-block bound
# holds for them. (Arithmetic coding can squeeze a flat picture below it; lossless has
# no blocks.)
_HUFFMAN_DCT_FRAMES = frozenset({0xC0, 0xC1, 0xC2})


def jpeg_incomplete_reason(data: bytes) -> str | None:
    """Why the first picture of the JPEG `data` lacks image data, or None if it is whole."""
    pos, end = 2, len(data)
    blocks: int | None = None
    scan_bytes = 0
    while True:
        pos = data.find(b"\xff", pos)
        while 0 <= pos < end - 1 and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos < 0 or pos >= end - 1:
            return "the image data ends before its end marker"
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI
            break
        if marker in _STANDALONE_MARKERS or marker == 0x00:
            pos += 2
            continue
        if pos + 4 > end:
            return "the image data ends inside a marker segment"
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment_end = pos + 2 + length
        if length < 2 or segment_end > end:
            return "the image data ends inside a marker segment"
        if marker in _HUFFMAN_DCT_FRAMES and blocks is None:
            blocks = _frame_blocks(data[pos + 4 : segment_end])
        if marker == 0xDA:  # SOS: the entropy-coded data follows, up to the next marker
            found = _SCAN_MARKER.search(data, segment_end)
            if found is None:
                return "the image data ends inside a scan"
            scan_bytes += found.start() - segment_end
            pos = found.start()
        else:
            pos = segment_end
    if blocks and scan_bytes * 8 < blocks:
        return f"{scan_bytes} bytes of image data cannot hold {blocks} blocks"
    return None


def _frame_blocks(frame: bytes) -> int | None:
    """The number of 8x8 blocks of all components of a SOF segment's frame."""
    if len(frame) < 6:
        return None
    height = int.from_bytes(frame[1:3], "big")
    width = int.from_bytes(frame[3:5], "big")
    count = frame[5]
    factors = [
        (frame[i + 1] >> 4, frame[i + 1] & 0x0F)
        for i in range(6, 6 + 3 * count, 3)
        if i + 2 < len(frame)
    ]
    if not factors or not height:  # height 0: defined later by a DNL marker
        return None
    h_max = max(h for h, _ in factors) or 1
    v_max = max(v for _, v in factors) or 1
    total = 0
    for h, v in factors:
        cols = -(-width * h // h_max)
        rows = -(-height * v // v_max)
        total += -(-cols // 8) * -(-rows // 8)
    return total


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied, without transposing pixels."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    # Orientations 5-8 rotate by 90 degrees and swap the sides.
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Product shots with transparency go on white, as a catalog page would show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def to_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --- Input: upright, 8-bit, sRGB -------------------------------------------------------


def prepare_input(image: Image.Image) -> Image.Image:
    """The upright 8-bit sRGB "RGB" image, at the input's own size, for the model and output.

    Applies the EXIF orientation, reduces 16-bit and 32-bit pixels to 8 bits, converts an
    embedded ICC profile (RGB, CMYK or gray) to sRGB, and puts transparent pixels on white.
    """
    icc = image.info.get("icc_profile")
    image = ImageOps.exif_transpose(image)
    color, alpha = _split_alpha(_to_8bit(image))
    rgb = _to_srgb(color, icc)
    if alpha is not None:
        # Product shots with transparency go on white, as a catalog page would show them.
        # Compositing after the conversion puts them on sRGB white whatever the profile.
        rgb = Image.composite(rgb, Image.new("RGB", rgb.size, (255, 255, 255)), alpha)
    return rgb


# Modes holding one 16-bit or 32-bit gray channel. PNG's 16-bit grayscale opens as "I;16";
# Pillow's own convert("L"/"RGB") clips these at 255 instead of scaling them, so a 16-bit
# gradient would reach the model almost entirely white. (16-bit RGB, RGBA and gray+alpha
# PNGs already open as 8-bit "RGB"/"RGBA" with the values scaled by Pillow.)
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_8bit(image: Image.Image) -> Image.Image:
    """`image` with 8-bit channels: "L" (or "LA" if it had a transparent value) for wide gray.

    "I;16*" and "I" are read as 0..65535 (what a 16-bit PNG holds; "I" beyond that is
    clipped), and "F" as 0.0..1.0, the convention of floating-point image data.
    """
    if image.mode in _WIDE_GRAY_MODES:
        values = np.asarray(image).astype(np.float64)
        full_scale = 65535.0
    elif image.mode == "F":
        values = np.asarray(image).astype(np.float64)
        full_scale = 1.0
    else:
        return image
    # value / 257 rounded is the exact 16-to-8-bit rescale: 0 -> 0, 65535 -> 255.
    scaled = np.round(np.clip(np.nan_to_num(values / full_scale), 0.0, 1.0) * 255.0)
    gray = Image.fromarray(scaled.astype(np.uint8))
    transparent = image.info.get("transparency")  # PNG tRNS: one 16-bit gray value
    if isinstance(transparent, int) and image.mode != "F":
        alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8))
        return Image.merge("LA", (gray, alpha))
    return gray


def _split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """The colour channels as "L", "RGB" or "CMYK" (what ICC profiles describe), and the
    alpha channel if any pixel is not fully opaque."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        gray = image.mode in ("1", "L", "LA", "La")
        with_alpha = image.convert("LA" if gray else "RGBA")
        alpha = with_alpha.getchannel("A")
        color = with_alpha.convert("L" if gray else "RGB")
        return color, (None if alpha.getextrema() == (255, 255) else alpha)
    if image.mode in ("L", "RGB", "CMYK"):
        return image, None
    return image.convert("L" if image.mode == "1" else "RGB"), None


# Relative colorimetric with black point compensation, the usual choice for photographs:
# colours inside sRGB keep their exact values (perceptual would desaturate the whole
# picture to make room, and matrix profiles like Display P3 and Adobe RGB have no
# perceptual tables anyway), colours outside are clipped to the nearest sRGB colour, and
# BPC maps the source's black to sRGB black so CMYK shadows don't turn grey or block up.
_INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC
_FLAGS = ImageCms.Flags.BLACKPOINTCOMPENSATION
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# Profile colour space -> the Pillow mode its transform reads.
_PROFILE_MODES = {"RGB": "RGB", "CMYK": "CMYK", "GRAY": "L"}


@dataclass(frozen=True)
class _IccProfile:
    """Embedded profile bytes, compared and hashed by their digest (the transform cache key)."""

    digest: bytes
    data: bytes = field(compare=False, repr=False)

    @classmethod
    def of(cls, data: bytes) -> _IccProfile:
        return cls(hashlib.sha256(data).digest(), data)


class _UnusableProfile(Exception):
    pass


def _to_srgb(color: Image.Image, icc: bytes | None) -> Image.Image:
    """`color` ("L", "RGB" or "CMYK") converted from its ICC profile to sRGB "RGB".

    Without a profile the pixels are taken to be sRGB already (what browsers assume), and a
    CMYK image gets Pillow's plain ink-to-RGB formula. A profile that cannot be used is
    logged and ignored rather than failing the edit: the colours may be off, the image is
    still the customer's.
    """
    if icc:
        try:
            transform, in_mode = _srgb_transform(_IccProfile.of(icc), color.mode)
            if color.mode != in_mode:
                color = color.convert(in_mode)
            return ImageCms.applyTransform(color, transform)
        except (_UnusableProfile, ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
            log.warning("ignoring the image's ICC profile, treating it as sRGB: %s", exc)
    return color if color.mode == "RGB" else color.convert("RGB")


@functools.lru_cache(maxsize=16)
def _srgb_transform(profile: _IccProfile, mode: str) -> tuple[ImageCms.ImageCmsTransform, str]:
    """The transform from `profile` to sRGB for `mode` pixels, and the mode it reads.

    Building one takes milliseconds, and a shop sends thousands of photos with the same
    two or three profiles, so transforms are cached by the profile's digest and the mode.
    """
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile.data))
    space = source.profile.xcolor_space.strip()
    in_mode = _PROFILE_MODES.get(space)
    # Gray pixels are also valid RGB; any other mismatch means the tag is wrong.
    if in_mode is None or (mode != in_mode and (mode, in_mode) != ("L", "RGB")):
        raise _UnusableProfile(f"a {space!r} profile does not describe {mode} pixels")
    return ImageCms.buildTransform(source, _SRGB, in_mode, "RGB", _INTENT, _FLAGS), in_mode


# --- Output: encoded, tagged sRGB -------------------------------------------------------


@dataclass(frozen=True)
class OutputEncoding:
    """How an output format is written: Pillow's format name, HTTP content type, file
    extension (without the dot)."""

    pillow_format: str
    content_type: str
    extension: str


OUTPUT_FORMATS = {
    "png": OutputEncoding("PNG", "image/png", "png"),
    "jpeg": OutputEncoding("JPEG", "image/jpeg", "jpg"),
    "webp": OutputEncoding("WEBP", "image/webp", "webp"),
}


def _fixed_creation_date(profile: bytes) -> bytes:
    """littlecms stamps a profile with the time it was built (header bytes 24-35), which
    would make the same edit's output differ byte for byte between worker processes."""
    date = struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
    return profile[:24] + date + profile[36:]


# Every output says it is sRGB, so colour-managed viewers show what the model produced
# (and unmanaged ones assume sRGB anyway). 588 bytes per file.
SRGB_ICC_PROFILE = _fixed_creation_date(_SRGB.tobytes())

# Measured on a noisy, photo-like 2048x1365 RGB image (2 CPU cores, Pillow 13):
#   PNG level 1: 229 ms, 5127 kB   level 3: 307 ms, 5071 kB   level 6: 551 ms, 4458 kB
# Photos barely compress losslessly; level 1 is within 1% of level 3's size for 3/4 of the
# time, and level 6 saves 13% for 2.4x the time.
_PNG_COMPRESS_LEVEL = 1
# JPEG q85: 4:2:0 6 ms, 229 kB; 4:4:4 9 ms, 322 kB. q95: 4:2:0 7 ms, 651 kB; 4:4:4 12 ms,
# 1036 kB. optimize=True (q85 4:2:0) saves 13% but doubles the time, so it stays off.
# Below quality 90 a client asked for a small file, and colour detail is the first thing
# the eye doesn't miss; from 90 on it asked for fidelity, and 4:2:0 would blur coloured
# edges such as red print on a product label.
_JPEG_FULL_CHROMA_FROM = 90
# WebP q85: method 0 34 ms, 94 kB; 2: 55 ms, 80 kB; 4 (libwebp's default): 158 ms, 76 kB;
# 6: 211 ms, 56 kB. Method 2 is a third of the default's time for 5% more bytes.
_WEBP_METHOD = 2


def encode_output(image: Image.Image, fmt: str, quality: int) -> bytes:
    """`image` (8-bit sRGB "RGB") encoded as OUTPUT_FORMATS[fmt], tagged as sRGB.

    `quality` (1..100) applies to JPEG and WebP; PNG is lossless and ignores it.
    """
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format {fmt!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be 1..100, not {quality}")
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    options: dict[str, object] = {"icc_profile": SRGB_ICC_PROFILE}
    if fmt == "png":
        options["compress_level"] = _PNG_COMPRESS_LEVEL
    elif fmt == "jpeg":
        subsampling = "4:4:4" if quality >= _JPEG_FULL_CHROMA_FROM else "4:2:0"
        options.update(quality=quality, optimize=False, subsampling=subsampling)
    else:
        options.update(quality=quality, method=_WEBP_METHOD)
    buf = io.BytesIO()
    image.save(buf, format=OUTPUT_FORMATS[fmt].pillow_format, **options)
    return buf.getvalue()


# --- Masks ------------------------------------------------------------------------------

_BINARY = [0] * 128 + [255] * 128  # 0..127 -> keep (0), 128..255 -> may change (255)


def prepare_mask(data: bytes, size: tuple[int, int], invert: bool) -> Image.Image:
    """The uploaded mask as an "L" image of `size` holding only 0 (keep) and 255 (may change).

    `size` is the upright input image's (width, height); the mask is uprighted by its own
    EXIF orientation and stretched to it. Raises ImageRejected for the same reasons as
    decode_image, and "mask_empty" if, after `invert`, no pixel may change.
    """
    image = ImageOps.exif_transpose(decode_image(data).image)
    gray = _mask_luminance(_to_8bit(image))
    if gray.size != tuple(size):
        gray = gray.resize(tuple(size), Image.Resampling.BILINEAR)
    # Binarising after resizing keeps edges where the user drew them, and cleans up JPEG
    # ringing and anti-aliased brush edges.
    mask = gray.point(_BINARY)
    if invert:
        mask = ImageOps.invert(mask)
    if mask.getbbox() is None:  # no non-zero pixel
        raise ImageRejected(
            "mask_empty",
            "the mask is all black (after mask_invert, if set), so nothing may change; "
            "white marks where the edit may change the image, black where it must not",
        )
    return mask


def _mask_luminance(image: Image.Image) -> Image.Image:
    """The mask's luminance as "L".

    Editors paint masks as strokes on a transparent layer: the transparent rest is where the
    user did not paint, so it must mean "keep". Compositing on black gives exactly that, and
    half-transparent brush edges become grey and are decided by the threshold.
    """
    color, alpha = _split_alpha(image)
    gray = color.convert("L")
    if alpha is None:
        return gray
    return Image.composite(gray, Image.new("L", gray.size, 0), alpha)
