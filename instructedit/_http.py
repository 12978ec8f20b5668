"""What the sync and async clients share: settings, auth, retries, uploads, file names."""

from __future__ import annotations

import json
import mimetypes
import os
import random
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx
from httpx_sse import ServerSentEvent
from tenacity import retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from instructedit.errors import (
    APIConnectionError,
    InvalidRequestError,
    RateLimitError,
    ServiceUnavailableError,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
ENV_URL = "INSTRUCTEDIT_URL"
ENV_API_KEY = "INSTRUCTEDIT_API_KEY"
# Backoff without Retry-After: 0.5 s, 1 s, 2 s, ... plus up to 0.5 s of jitter, at most 30 s.
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
# A Retry-After longer than this is not waited out: the error goes to the caller, with
# `retry_after` saying when to come back.
MAX_RETRY_AFTER_S = 60.0
# A job's event stream sends a heartbeat every 15 s: reads wait at least this long.
STREAM_READ_TIMEOUT_S = 45.0
# `?wait=` holds the submit up to this long (the API's bound).
MAX_SUBMIT_WAIT_S = 60.0

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
FORMAT_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}

Upload = str | os.PathLike | bytes | IO[bytes]


def resolve_base_url(base_url: str | None) -> str:
    url = base_url or os.environ.get(ENV_URL) or DEFAULT_BASE_URL
    return url.rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else (os.environ.get(ENV_API_KEY) or None)


def origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    parts = urlsplit(str(url))
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


class KeyAuth(httpx.Auth):
    """`Authorization: Bearer <key>` on requests to the API's own origin only: an output URL
    on another host (a presigned S3 link) never sees the key."""

    def __init__(self, api_key: str | None, base_url: str) -> None:
        self.api_key = api_key
        self.origin = origin(base_url)

    def auth_flow(self, request: httpx.Request):
        if self.api_key and origin(request.url) == self.origin:
            request.headers["Authorization"] = f"Bearer {self.api_key}"
        yield request


def user_agent() -> str:
    from instructedit import __version__

    return f"instructedit-python/{__version__}"


# -- retries -------------------------------------------------------------------------------


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, APIConnectionError):
        return True
    if isinstance(exc, RateLimitError | ServiceUnavailableError):
        return exc.retry_after is None or exc.retry_after <= MAX_RETRY_AFTER_S
    return False


_backoff = wait_exponential(multiplier=BACKOFF_INITIAL_S, max=BACKOFF_MAX_S) + wait_random(0, 0.5)


def _wait(retry_state) -> float:
    """Retry-After when the server sent it (plus a little jitter, so that clients told
    the same time do not return together), else exponential backoff with jitter."""
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        return retry_after + random.uniform(0, 0.1)
    return _backoff(retry_state)


def retry_options(max_retries: int, idempotent: bool) -> dict[str, Any]:
    """tenacity's options for one request: retried on 429, 503 and network failures when
    it is safe to send it again."""
    return {
        "retry": retry_if_exception(_retryable),
        "stop": stop_after_attempt(1 + (max_retries if idempotent else 0)),
        "wait": _wait,
        "reraise": True,
    }


# -- requests ------------------------------------------------------------------------------


def upload(source: Upload, default_name: str) -> tuple[str, bytes, str]:
    """An image argument as a multipart file: (file name, bytes, content type). Read once,
    so that a retried submission sends the same bytes."""
    if isinstance(source, bytes | bytearray | memoryview):
        name, data = default_name, bytes(source)
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        name, data = path.name, path.read_bytes()
    elif hasattr(source, "read"):
        data = source.read()
        if isinstance(data, str):
            raise TypeError(f"{default_name}: open the file in binary mode ('rb')")
        given = getattr(source, "name", None)
        name = Path(given).name if isinstance(given, str) and given else default_name
    else:
        raise TypeError(
            f"{default_name} must be a path, bytes or a binary file, not {type(source).__name__}"
        )
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return name, data, content_type


def check_wait(wait: float | None) -> None:
    if wait is not None and not 0 < wait <= MAX_SUBMIT_WAIT_S:
        raise InvalidRequestError(
            422, "invalid_wait", f"wait: must be more than 0 and at most {MAX_SUBMIT_WAIT_S:g} s"
        )


def page_params(status: str | None, limit: int, cursor: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if status is not None:
        params["status"] = str(getattr(status, "value", status))
    if cursor is not None:
        params["cursor"] = cursor
    return params


def sse_dict(event: ServerSentEvent) -> dict[str, Any]:
    try:
        data: Any = json.loads(event.data) if event.data else None
    except ValueError:
        data = event.data
    return {"event": event.event, "id": event.id or None, "data": data}


# -- downloads -----------------------------------------------------------------------------


def extension(content_type: str | None, output_format: str | None) -> str:
    media = (content_type or "").split(";")[0].strip().lower()
    if media in EXTENSIONS:
        return EXTENSIONS[media]
    return FORMAT_EXTENSIONS.get(str(output_format or "png"), "png")


def output_path(directory: Path, stem: str, index: int, count: int, ext: str) -> Path:
    name = f"{stem}.{ext}" if count == 1 else f"{stem}-{index}.{ext}"
    return directory / name


def write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (a partial file never has its name)."""
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def timeout_for(timeout: float, at_least: float | None = None) -> httpx.Timeout:
    if at_least is None:
        return httpx.Timeout(timeout)
    return httpx.Timeout(timeout, read=max(timeout, at_least))
