"""An oversized submission is refused before the API takes in its body: over real HTTP
(uvicorn), with a declared Content-Length and with a chunked body that never declares one."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from services.api.main import create_app
from services.api.uploads import FILES_PER_SUBMISSION, MULTIPART_OVERHEAD
from tests.api.test_metrics import value
from tests.conftest import image_bytes
from tests.stack import free_port

BOUNDARY = "instructedit-test-boundary"


@pytest.fixture
def server(settings):
    """The app served by uvicorn in a thread; yields its port."""
    port = free_port()
    # log_config=None: uvicorn would otherwise reconfigure this test process's loggers.
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_config=None, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(10)


def multipart_head(prompt: str = "make it red") -> bytes:
    return (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="prompt"\r\n\r\n'
        f"{prompt}\r\n"
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="image"; filename="shoe.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()


def multipart_tail() -> bytes:
    return f"\r\n--{BOUNDARY}--\r\n".encode()


def request_head(**headers: str) -> bytes:
    lines = [
        "POST /v1/edits HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """Status, headers and JSON body of one response; fails if none comes within the
    socket's timeout."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(status_line.split()[1]), headers, json.loads(body)


def test_declared_oversized_body_is_refused_before_it_is_sent(server, settings):
    def refused_submissions() -> float:
        metrics = httpx.get(f"http://127.0.0.1:{server}/metrics").text
        labels = {"method": "POST", "route": "/v1/edits", "status": "413"}
        return value(metrics, "instructedit_api_requests_total", **labels)

    before = refused_submissions()
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        # Announce 100 MB and send none of it: the answer must not wait for the body.
        sock.sendall(request_head(Content_Length=str(100 * 1024 * 1024)))
        status, headers, body = read_response(sock)
    assert status == 413
    assert body["error"]["code"] == "upload_too_large"
    assert str(settings.max_upload_bytes) in body["error"]["message"]
    # Answered inside the request context: it has a request id and counts as a submission.
    assert "x-request-id" in headers
    assert refused_submissions() == before + 1


def test_chunked_body_is_cut_off_once_over_the_limit(server, settings):
    # An image and a mask, each up to the upload limit, and the form around them.
    limit = FILES_PER_SUBMISSION * settings.max_upload_bytes + MULTIPART_OVERHEAD
    piece = bytes(16 * 1024)
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        sock.sendall(request_head(Transfer_Encoding="chunked"))
        data, sent = multipart_head(), 0
        # Just past the limit, no further: bytes the server never reads would make its
        # close a reset that can swallow the answer.
        while sent <= limit:
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            sent += len(data)
            data = piece
        # The body never ends (no last chunk): only the limit can have answered.
        status, _, body = read_response(sock)
    assert status == 413
    assert body["error"]["code"] == "upload_too_large"


def test_chunked_upload_within_the_limit_is_accepted(server):
    def body():
        yield multipart_head()
        yield image_bytes()
        yield multipart_tail()

    response = httpx.post(
        f"http://127.0.0.1:{server}/v1/edits",
        content=body(),  # a generator: sent chunked, without Content-Length
        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert response.status_code == 202, response.text
    assert response.request.headers.get("transfer-encoding") == "chunked"


def test_limit_applies_only_to_submissions(server):
    # Other routes, and other methods on the submit path, never see the limiter.
    response = httpx.post(
        f"http://127.0.0.1:{server}/v1/datasets",
        content=b"{" + b" " * (1024 * 1024) + b"}",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422
