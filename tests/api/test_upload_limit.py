"""Request bodies over real HTTP (uvicorn): an oversized submission is refused before the
API takes in its body, with a declared Content-Length and with a chunked body that never
declares one; a body that stops coming is answered 408 and its connection closed; a
multipart body cut off before its closing boundary is refused."""

from __future__ import annotations

import contextlib
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
    """The app served by uvicorn in a thread; yields its port. Without keys: these tests
    send raw bytes, and what they test happens before a route looks at the key."""
    with serve(settings.model_copy(update={"auth": "disabled"})) as port:
        yield port


@contextlib.contextmanager
def serve(settings):
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


@pytest.fixture
def impatient_server(settings):
    """The app with a 1 s body read timeout."""
    with serve(settings.model_copy(update={"body_read_timeout_s": 1.0})) as port:
        yield port


@pytest.mark.parametrize(
    "head,sent",
    [
        (request_head, multipart_head()),
        (
            lambda **h: (
                "POST /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\n"
                + "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in h.items())
                + "\r\n"
            ).encode(),
            b'{"rows": [',
        ),
    ],
    ids=["submission", "json"],
)
def test_body_that_stops_coming_is_408_and_the_connection_closed(impatient_server, head, sent):
    with socket.create_connection(("127.0.0.1", impatient_server), timeout=10) as sock:
        # Declares 10 kB, sends the first few bytes, then nothing more.
        sock.sendall(head(Content_Length="10000") + sent)
        started = time.monotonic()
        status, headers, body = read_response(sock)
        waited = time.monotonic() - started
        assert status == 408
        assert body["error"]["code"] == "request_timeout"
        assert headers["connection"] == "close"
        assert 0.8 < waited < 5
        assert sock.recv(1) == b""  # closed: the descriptor is not held


def cut_submission(closed: bool) -> bytes:
    """A submission whose last field is num_inference_steps=5, with or without the closing
    boundary after it."""
    body = (
        multipart_head()
        + image_bytes()
        + (
            f"\r\n--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="num_inference_steps"\r\n\r\n'
            "5"
        ).encode()
    )
    return body + multipart_tail() if closed else body


@pytest.mark.parametrize("closed", [True, False])
def test_multipart_body_cut_inside_its_last_field_is_refused(server, closed):
    body = cut_submission(closed)
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(request_head(Content_Length=str(len(body))) + body)
        status, _, answer = read_response(sock)
    if closed:
        assert status == 202, answer
        assert answer["params"]["num_inference_steps"] == 5
    else:
        # Without the check the cut field vanished and the job ran with 20 steps.
        assert status == 400, answer
        assert answer["error"]["code"] == "malformed_multipart"


def test_closing_boundary_split_across_chunks_is_found(server):
    body = cut_submission(closed=True)

    def byte_by_byte_tail():
        yield body[:-40]
        for i in range(len(body) - 40, len(body)):
            yield body[i : i + 1]

    response = httpx.post(
        f"http://127.0.0.1:{server}/v1/edits",
        content=byte_by_byte_tail(),
        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert response.status_code == 202, response.text
