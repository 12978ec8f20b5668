"""The SDK's exceptions: one class per kind of failure, carrying the API's error code.

Every error the API answers is JSON ``{"error": {"code", "message"}}``; `APIError` keeps
the status, the code and the message, and ``Retry-After`` when the server sent one.
"""

from __future__ import annotations

import email.utils
import time
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from instructedit.jobs import Job


class InstructEditError(Exception):
    """The base of every exception this SDK raises."""


class APIError(InstructEditError):
    """The API answered with an error status."""

    def __init__(
        self,
        status_code: int | None,
        code: str,
        message: str,
        *,
        retry_after: float | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.response = response

    @property
    def details(self) -> list[dict] | None:
        """The error's item-by-item details where the API gives them (the captions it
        could not map, the rows each audit rule rejects); None otherwise."""
        if self.response is None:
            return None
        try:
            details = self.response.json().get("error", {}).get("details")
        except (ValueError, AttributeError):
            return None
        return details if isinstance(details, list) else None

    def __str__(self) -> str:
        status = f"{self.status_code} " if self.status_code is not None else ""
        return f"{status}{self.code}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status_code={self.status_code!r}, code={self.code!r}, "
            f"message={self.message!r})"
        )


class AuthenticationError(APIError):
    """401: no API key, or one that is unknown or revoked."""


class NotFoundError(APIError):
    """404: no such job or run for this key (another key's is missing too)."""


class ConflictError(APIError):
    """409: the job or run is not in a state that allows this."""


class InvalidRequestError(APIError):
    """400, 413, 415, 422: the request itself is wrong (a parameter out of bounds, an
    upload too large, an image that cannot be read). Also raised before any request is
    sent, for a parameter the API would refuse (then ``status_code`` is the 422 the API
    would have answered, and ``response`` is None)."""


class RateLimitError(APIError):
    """429: the key's rate limit or unfinished-job cap was reached (see ``retry_after``)."""


class ServiceUnavailableError(APIError):
    """503: the queue is full or a dependency of the API is down (see ``retry_after``)."""


class APIConnectionError(InstructEditError):
    """The API could not be reached: connection refused, DNS failure, a timeout."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.url = url


class JobFailed(InstructEditError):
    """`Job.raise_for_status()` on a job that ended failed or canceled."""

    def __init__(self, job: Job) -> None:
        self.job = job
        error = job.error or {}
        if job.status == "canceled":
            message = f"job {job.id} was canceled"
        else:
            detail = ": ".join(str(p) for p in (error.get("code"), error.get("message")) if p)
            message = f"job {job.id} failed" + (f" ({detail})" if detail else "")
        super().__init__(message)
        self.code: str | None = error.get("code")


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: InvalidRequestError,
    415: InvalidRequestError,
    422: InvalidRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def error_from_response(response: httpx.Response) -> APIError:
    """The typed exception for an error response (its body must have been read)."""
    code, message = f"http_{response.status_code}", ""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code") or code)
        message = str(body["error"].get("message") or "")
    if not message:
        text = response.text.strip().splitlines()
        message = text[0][:200] if text else response.reason_phrase or "error"
    cls = _BY_STATUS.get(response.status_code, APIError)
    return cls(
        response.status_code,
        code,
        message,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
        response=response,
    )


def connection_error(exc: httpx.TransportError, url: str) -> APIConnectionError:
    """A one-line APIConnectionError naming ``url`` for a network failure."""
    if isinstance(exc, httpx.ConnectTimeout):
        reason = "connection timed out"
    elif isinstance(exc, httpx.TimeoutException):
        reason = "timed out waiting for a response"
    elif isinstance(exc, httpx.ConnectError):
        text = str(exc).lower()
        if "refused" in text or "errno 111" in text or "errno 61" in text:
            reason = "connection refused"
        elif "name or service" in text or "nodename" in text or "getaddrinfo" in text:
            reason = "unknown host"
        else:
            reason = str(exc) or "cannot connect"
    else:
        reason = str(exc) or type(exc).__name__
    return APIConnectionError(f"cannot reach the InstructEdit API at {url}: {reason}", url=url)
