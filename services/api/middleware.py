"""Request context: the request id, the access log line and the HTTP metrics.

A pure ASGI middleware (no BaseHTTPMiddleware: that one runs the endpoint in another task,
costs a copy of the response stream, and loses context variables set inside it).
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.metrics import REQUEST_DURATION, REQUESTS
from services.common.logging import bind_request_id

REQUEST_ID_HEADER = "x-request-id"
# A client's id is kept when it is a sane token; anything else (too long, spaces, quotes)
# would be an injection into logs and headers, and is replaced by a fresh id.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
UNMATCHED_ROUTE = "<unmatched>"
# Probes and scrapes come every few seconds; their successes are logged at DEBUG only.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})

access_log = logging.getLogger("instructedit.api.access")


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id":
            candidate = value.decode("latin-1").strip()
            if _VALID_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return new_request_id()


def route_template(scope: Scope) -> str:
    """The path pattern of the route that served the request (`/v1/edits/{job_id}`)."""
    route = scope.get("route")
    if route is None:
        return UNMATCHED_ROUTE
    return getattr(route, "path_format", None) or getattr(route, "path", UNMATCHED_ROUTE)


class RequestContextMiddleware:
    """Binds the request id (from `X-Request-ID` or new) for logs, `request.state` and the
    response header, and records the request's metrics and access log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope.get("headers", []))
        # request.state reads scope["state"]; uvicorn gives every request its own dict.
        scope.setdefault("state", {})["request_id"] = request_id
        header = (REQUEST_ID_HEADER.encode(), request_id.encode())
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        with bind_request_id(request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - start
                method = scope.get("method", "")
                route = route_template(scope)
                REQUESTS.labels(method, route, str(status)).inc()
                REQUEST_DURATION.labels(method, route).observe(elapsed)
                quiet = route in QUIET_ROUTES and status < 400
                access_log.log(
                    logging.DEBUG if quiet else logging.INFO,
                    "%s %s %d %.1fms",
                    method,
                    scope.get("path", ""),
                    status,
                    elapsed * 1000,
                    extra={
                        "method": method,
                        "path": scope.get("path", ""),
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )
