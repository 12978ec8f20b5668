"""Reading and checking an uploaded image before anything is stored."""

from __future__ import annotations

from types import SimpleNamespace

from fastapi import UploadFile
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import APIError, error_response
from services.common.images import DecodedImage, ImageRejected, decode_image, prepare_mask

_REJECTION_STATUS = {"unsupported_image_format": 415, "image_too_large": 413}
_CHUNK = 1024 * 1024
# What a submission carries besides its files: the other form fields (two prompts of at
# most 500 characters, a few numbers), part headers and boundaries. Generous, so the exact
# limit stays with the image check after parsing.
MULTIPART_OVERHEAD = 64 * 1024
# A submission holds the image and, optionally, a mask, each within the upload limit.
FILES_PER_SUBMISSION = 2


def _too_large(max_bytes: int, what: str = "the image") -> APIError:
    return APIError(
        413, "upload_too_large", f"{what} is larger than the limit of {max_bytes} bytes"
    )


def read_limited(upload: UploadFile, max_bytes: int, what: str = "the image") -> bytes:
    chunks, size = [], 0
    while chunk := upload.file.read(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes, what)
        chunks.append(chunk)
    return b"".join(chunks)


def check_image(data: bytes) -> DecodedImage:
    try:
        return decode_image(data)
    except ImageRejected as exc:
        raise APIError(_REJECTION_STATUS.get(exc.code, 422), exc.code, exc.message) from None


def check_mask(data: bytes, size: tuple[int, int], invert: bool) -> None:
    """422 (415, 413) naming what is wrong with a mask upload, as the worker would find it:
    not an image, unreadable, or nothing left that the edit may change."""
    try:
        prepare_mask(data, size, invert)
    except ImageRejected as exc:
        code = exc.code if exc.code.startswith("mask_") else f"mask_{exc.code}"
        raise APIError(_REJECTION_STATUS.get(exc.code, 422), code, f"mask: {exc.message}") from None


class UploadLimitMiddleware:
    """413 for a submission whose body cannot fit the upload limit, before it is read.

    Starlette parses (and spools to disk) the whole multipart body before the route runs,
    so the route's own check comes after a client has made the API take in any amount of
    data. Here a declared Content-Length over the limit is refused without reading the
    body, and a body without one (chunked) is counted as it streams and cut off once over.
    """

    def __init__(self, app: ASGIApp, max_upload_bytes: int, path: str = "/v1/edits") -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_body_bytes = FILES_PER_SUBMISSION * max_upload_bytes + MULTIPART_OVERHEAD
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(scope, receive, send)
            return

        received = 0
        over = started = False

        async def receive_limited() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # To the app the client is gone: it stops parsing, and the 413 below
                    # replaces whatever it answers.
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_over(message: Message) -> None:
            nonlocal started
            if over and not started:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive_limited, send_unless_over)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Refused before routing, it is still a submission: metrics and the access log
        # count it under the submit route rather than as an unmatched path.
        scope.setdefault("route", SimpleNamespace(path_format=self.path))
        error = _too_large(self.max_upload_bytes)
        # The unread rest of the body makes the server close the connection after this.
        response = error_response(error.status_code, error.code, error.message)
        await response(scope, receive, send)
