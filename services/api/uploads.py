"""Reading and checking an uploaded image before anything is stored."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from types import SimpleNamespace

from fastapi import Request, UploadFile
from starlette.datastructures import Headers
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import APIError, error_response
from services.common.images import (
    DecodedImage,
    ImageRejected,
    check_image_upload,
    prepare_mask,
)
from services.common.settings import get_settings

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


@functools.cache
def decode_slots() -> threading.BoundedSemaphore:
    """The slots of the uploads checked at once; further requests wait for one. Each check
    may hold a picture of up to MAX_PIXELS (a PNG or a mask), so this bounds the API's
    memory under a burst of large uploads."""
    limit = get_settings().max_concurrent_decodes or 2 * (os.cpu_count() or 1)
    return threading.BoundedSemaphore(limit)


def check_image(data: bytes) -> DecodedImage:
    """The upload checked as the worker will decode it, without holding its full-size
    pixels (services.common.images.check_image_upload); 422 (415, 413) if it is refused."""
    try:
        with decode_slots():
            return check_image_upload(data)
    except ImageRejected as exc:
        raise APIError(_REJECTION_STATUS.get(exc.code, 422), exc.code, exc.message) from None


def check_mask(data: bytes, size: tuple[int, int], invert: bool) -> None:
    """422 (415, 413) naming what is wrong with a mask upload, as the worker would find it:
    not an image, unreadable, or nothing left that the edit may change."""
    try:
        with decode_slots():
            prepare_mask(data, size, invert)
    except ImageRejected as exc:
        code = exc.code if exc.code.startswith("mask_") else f"mask_{exc.code}"
        raise APIError(_REJECTION_STATUS.get(exc.code, 422), code, f"mask: {exc.message}") from None


async def reject_duplicate_fields(request: Request) -> None:
    """422 `duplicate_field` for a form that sends a field twice: which value was meant is
    anyone's guess, and taking the last one silently edits with what the client may not
    have asked for. (The form is parsed once; FastAPI reads the same one.)"""
    form = await request.form()
    seen: set[str] = set()
    for name, value in form.multi_items():
        if isinstance(value, StarletteUploadFile):
            continue
        if name in seen:
            raise APIError(422, "duplicate_field", f"{name}: the form field is sent more than once")
        seen.add(name)


def _closing_delimiter(content_type: str) -> bytes | None:
    """The delimiter that closes a multipart/form-data body of `content_type`, or None for
    any other body."""
    media_type, _, rest = content_type.partition(";")
    if media_type.strip().lower() != "multipart/form-data":
        return None
    for param in rest.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary" and value.strip().strip('"'):
            return b"\r\n--" + value.strip().strip('"').encode("latin-1") + b"--"
    return None


class UploadLimitMiddleware:
    """Guards request bodies while the app reads them.

    - 413 for a submission whose body cannot fit the upload limit, before it is read.
      Starlette parses (and spools to disk) the whole multipart body before the route runs,
      so the route's own check comes after a client has made the API take in any amount of
      data. Here a declared Content-Length over the limit is refused without reading the
      body, and a body without one (chunked) is counted as it streams and cut off once over.
    - 408 `request_timeout` when the next part of a body does not come within the read
      timeout (a client that declares more than it sends would hold the request, and its
      connection, forever), and the connection is closed.
    - 400 `malformed_multipart` for a multipart/form-data body that ends without its
      closing boundary: the multipart parser drops the cut-off last part without a word,
      and that field would silently take its default.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_upload_bytes: int,
        path: str = "/v1/edits",
        body_read_timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_body_bytes = FILES_PER_SUBMISSION * max_upload_bytes + MULTIPART_OVERHEAD
        self.path = path
        # None: the app's settings' (app.state.settings), read per request.
        self.body_read_timeout_s = body_read_timeout_s

    def _read_timeout(self, scope: Scope) -> float:
        if self.body_read_timeout_s is not None:
            return self.body_read_timeout_s
        settings = getattr(getattr(scope.get("app"), "state", None), "settings", None)
        return (settings or get_settings()).body_read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limited = scope["method"] == "POST" and scope["path"] == self.path
        declared = headers.get("content-length", "")
        if limited and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(scope, receive, send, _too_large(self.max_upload_bytes))
            return

        timeout = self._read_timeout(scope)
        closing = _closing_delimiter(headers.get("content-type", ""))
        # The body as if preceded by a line break, so a closing delimiter at its very start
        # (a form without parts) is found like any other.
        tail = b"\r\n"
        received = 0
        closed = body_done = started = False
        refusal: APIError | None = None

        def refuse(error: APIError) -> Message:
            # To the app the client is gone: it stops parsing, and the refusal below
            # replaces whatever it answers.
            nonlocal refusal
            refusal = error
            return {"type": "http.disconnect"}

        async def guarded_receive() -> Message:
            nonlocal received, tail, closed, body_done
            if refusal is not None:
                return {"type": "http.disconnect"}
            if body_done:  # after the body, the app waits for a disconnect: no timeout
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                return refuse(_read_timed_out(timeout))
            if message["type"] != "http.request":
                return message
            body = message.get("body", b"")
            received += len(body)
            if limited and received > self.max_body_bytes:
                return refuse(_too_large(self.max_upload_bytes))
            if closing is not None and not closed:
                window = tail + body
                closed = closing in window
                tail = window[-(len(closing) - 1) :]
            if not message.get("more_body", False):
                body_done = True
                if closing is not None and not closed:
                    return refuse(_unclosed_multipart())
            return message

        async def send_unless_refused(message: Message) -> None:
            nonlocal started
            if refusal is not None and not started:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, send_unless_refused)
        except Exception:
            if refusal is None or started:
                raise
        if refusal is not None and not started:
            await self._reject(scope, receive, send, refusal)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
        if scope["method"] == "POST" and scope["path"] == self.path:
            # Refused before routing, it is still a submission: metrics and the access log
            # count it under the submit route rather than as an unmatched path.
            scope.setdefault("route", SimpleNamespace(path_format=self.path))
        headers = {}
        if error.status_code in (408, 413):
            # The unread rest of the body: the connection cannot carry another request.
            headers["connection"] = "close"
        response = error_response(error.status_code, error.code, error.message, **headers)
        await response(scope, receive, send)


def _read_timed_out(timeout: float) -> APIError:
    return APIError(
        408, "request_timeout", f"the request body did not arrive: nothing came for {timeout:g} s"
    )


def _unclosed_multipart() -> APIError:
    return APIError(
        400,
        "malformed_multipart",
        "the multipart/form-data body ends without its closing boundary: it was cut off",
    )
