"""Decoding uploaded images and preparing them for the model.

The API decodes every upload fully before accepting it, and the worker decodes the stored
copy again with the same function, so "accepted" and "processable" mean the same thing.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# Phones and cameras write multi-picture JPEGs (a depth map or a preview after the photo);
# Pillow names them MPO. The first picture is an ordinary JPEG and the one that is shown.
_FORMAT_ALIASES = {"MPO": "JPEG"}
# Pillow refuses more than ~179 MP by default; a product photo never needs that much and
# decoding it would cost the API gigabytes.
MAX_PIXELS = 50_000_000


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
    if not data:
        raise ImageRejected("empty_image", "the image file is empty")
    try:
        with warnings.catch_warnings():
            # Pillow warns from ~89 MP on; the check below is stricter and names the size.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = _FORMAT_ALIASES.get(image.format, image.format)
            if fmt not in ACCEPTED_FORMATS:
                raise ImageRejected(
                    "unsupported_image_format",
                    f"image format {fmt} is not supported; send JPEG, PNG or WebP",
                )
            if image.width * image.height > MAX_PIXELS:
                raise _too_large(f"{image.width}x{image.height}")
            # load() decodes every pixel: a cut-off file fails here, not inside the worker.
            image.load()
    except ImageRejected:
        raise
    except Image.DecompressionBombError:
        # open() itself raises this past twice Pillow's limit, before we could see the size.
        raise _too_large(f"over {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels") from None
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "the uploaded file is not an image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(
            "corrupt_image", f"the image could not be decoded (truncated or corrupt): {exc}"
        ) from None
    return DecodedImage(image=image, format=fmt)


def _too_large(size: str) -> ImageRejected:
    return ImageRejected(
        "image_too_large", f"image is {size}; at most {MAX_PIXELS} pixels are accepted"
    )


def model_input_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size the model sees: long side at most `max_side`, both sides multiples of 8.

    The VAE downsamples by 8, so other sizes would be cropped silently by the pipeline.
    """
    scale = min(1.0, max_side / max(width, height))
    return max(8, int(width * scale) // 8 * 8), max(8, int(height * scale) // 8 * 8)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied, without transposing pixels."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    # Orientations 5-8 rotate by 90 degrees and swap the sides.
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size


def to_model_input(image: Image.Image, max_side: int) -> Image.Image:
    """Upright RGB image of `model_input_size`."""
    image = ImageOps.exif_transpose(image)
    image = _to_rgb(image)
    size = model_input_size(*image.size, max_side)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


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
