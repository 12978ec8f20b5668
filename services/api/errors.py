"""Every error leaves the API as `{"error": {"code", "message"}}` with a fitting status."""

from __future__ import annotations

import logging
from typing import Any

import redis
from botocore.exceptions import BotoCoreError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.storage import StorageError

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    code: str
    message: str
    # What exactly was wrong, item by item, where a request has many parts (the captions
    # that could not be mapped, the rows an audit rule rejects); absent otherwise.
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class APIError(Exception):
    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        # What the status needs beside the body: WWW-Authenticate, Retry-After.
        self.headers = headers or {}
        self.details = details


def error_response(
    status_code: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    **headers: str,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message, details=details))
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=status_code, headers=headers or None
    )


def job_store_unavailable() -> APIError:
    return APIError(503, "job_store_unavailable", "job records cannot be reached; retry later")


def storage_unavailable() -> APIError:
    return APIError(503, "storage_unavailable", "image storage cannot be reached; retry later")


def queue_unavailable() -> APIError:
    return APIError(503, "queue_unavailable", "the job could not be queued; retry later")


# FastAPI's HTTPException detail for a request body it could not parse at all.
_UNPARSABLE_BODY = "There was an error parsing the body"


def _invalid_json(exc: RequestValidationError) -> dict | None:
    """The error of a body that is not JSON at all, if that is what failed."""
    return next((e for e in exc.errors() if e.get("type") == "json_invalid"), None)


def _describe_validation(exc: RequestValidationError) -> str:
    if (error := _invalid_json(exc)) is not None:
        # loc is ("body", <character offset>), ctx the decoder's complaint.
        position = error.get("loc", ("body", "?"))[-1]
        reason = (error.get("ctx") or {}).get("error", "JSON decode error")
        return f"the request body is not valid JSON: {reason} at character {position}"
    parts = []
    for err in exc.errors():
        # loc is like ("body", "num_inference_steps"); the field name is what a client needs.
        field = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{field}: {err.get('msg')}" if field else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def _validation_code(exc: RequestValidationError) -> str:
    if _invalid_json(exc) is not None:
        return "invalid_json"
    errors = exc.errors()
    fields = [str(e.get("loc", ("",))[-1]) for e in errors]
    if len(set(fields)) != 1:
        return "invalid_request"
    prefix = "missing" if errors[0].get("type") == "missing" else "invalid"
    return f"{prefix}_{fields[0]}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _as_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_code(exc), _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:
            # FastAPI's answer to a body it could not even decode (bytes that are not
            # UTF-8, say): for JSON that is broken JSON like any other.
            if "json" in request.headers.get("content-type", ""):
                return error_response(
                    422, "invalid_json", "the request body is not valid JSON (nor UTF-8 text)"
                )
            return error_response(400, "malformed_body", "the request body could not be parsed")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        # Starlette's headers carry what the status needs, such as a 405's Allow.
        return error_response(exc.status_code, code, str(exc.detail), **(exc.headers or {}))

    # A dependency that is down is the client's cue to retry, not a bug: 503, and the
    # cause in our log rather than in the response.
    @app.exception_handler(redis.RedisError)
    async def _redis_error(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.error("%s %s: Redis failed: %r", request.method, request.url.path, exc)
        return _as_response(job_store_unavailable())

    @app.exception_handler(StorageError)
    @app.exception_handler(BotoCoreError)
    async def _storage_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s: storage failed: %r", request.method, request.url.path, exc)
        return _as_response(storage_unavailable())

    # Anything else is a bug; its traceback goes to the server log, and the client still
    # gets the documented JSON shape instead of Starlette's plain-text 500.
    @app.exception_handler(Exception)
    async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "internal_error", "internal server error")


def _as_response(exc: APIError) -> JSONResponse:
    return error_response(exc.status_code, exc.code, exc.message, exc.details, **exc.headers)
