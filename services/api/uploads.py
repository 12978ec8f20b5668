"""Reading and checking an uploaded image before anything is stored."""

from __future__ import annotations

from fastapi import UploadFile

from services.api.errors import APIError
from services.common.images import DecodedImage, ImageRejected, decode_image

_REJECTION_STATUS = {"unsupported_image_format": 415, "image_too_large": 413}
_CHUNK = 1024 * 1024


def read_limited(upload: UploadFile, max_bytes: int) -> bytes:
    chunks, size = [], 0
    while chunk := upload.file.read(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise APIError(
                413, "upload_too_large", f"the image is larger than the limit of {max_bytes} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def check_image(data: bytes) -> DecodedImage:
    try:
        return decode_image(data)
    except ImageRejected as exc:
        raise APIError(_REJECTION_STATUS.get(exc.code, 422), exc.code, exc.message) from None
