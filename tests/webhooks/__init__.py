"""Webhook tests: a real HTTP receiver on 127.0.0.1 that records what it was sent."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


# What the receiver does with a request: it is given the request and the handler (to
# answer with), the n-th request of the receiver (0-based).
Behaviour = Callable[[BaseHTTPRequestHandler, Received, int], None]


def answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Behaviour:
    def behaviour(handler: BaseHTTPRequestHandler, _: Received, __: int) -> None:
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return behaviour


@dataclass
class Receiver:
    """An HTTP server in a thread; every request is recorded, then `behaviour` answers."""

    behaviour: Behaviour = field(default_factory=lambda: answer(204))
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self._handle()

            def do_GET(self) -> None:
                self._handle()

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Received(self.path, dict(self.headers.items()), body, time.monotonic())
                with receiver._lock:
                    index = len(receiver.received)
                    receiver.received.append(request)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    receiver.behaviour(self, request, index)
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.server.shutdown()
        self.server.server_close()
