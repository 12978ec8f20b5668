"""One signed delivery against a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import time

import pytest
from standardwebhooks import Webhook

from services.common.api_keys import new_webhook_secret
from services.common.webhook_delivery import deliver
from tests.stack import free_port
from tests.webhooks import Receiver, answer

ALLOWED = ("127.0.0.1",)
PAYLOAD = json.dumps({"type": "edit.completed", "timestamp": "2026-01-01T00:00:00+00:00"})
real_getaddrinfo = socket.getaddrinfo


def send(url: str, secret: str | None = None, **options):
    options.setdefault("allowed_hosts", ALLOWED)
    options.setdefault("timeout_s", 5.0)
    return deliver(url, secret or new_webhook_secret(), "msg_test1", PAYLOAD, **options)


def test_signed_delivery_verifies():
    secret = new_webhook_secret()
    with Receiver(answer(200, b"thanks")) as receiver:
        result = send(receiver.url(), secret)
    assert result.ok and result.status_code == 200 and result.error is None
    assert result.body == b"thanks"
    assert result.duration_ms >= 0
    [request] = receiver.received
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert Webhook(secret).verify(request.body, headers) == json.loads(PAYLOAD)
    assert request.body == PAYLOAD.encode()
    assert headers["webhook-id"] == "msg_test1"
    assert headers["webhook-timestamp"].isdigit()
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert headers["webhook-signature"].startswith("v1,")
    assert headers["content-type"] == "application/json"
    assert "InstructEdit" in headers["user-agent"]
    assert headers["host"] == f"127.0.0.1:{receiver.port}"
    assert request.path == "/hook"


def test_another_secret_does_not_verify():
    with Receiver() as receiver:
        assert send(receiver.url()).ok
    [request] = receiver.received
    with pytest.raises(Exception, match="signature"):
        Webhook(new_webhook_secret()).verify(request.body, request.headers)


def test_the_checked_address_is_the_one_connected_to(monkeypatch):
    """A rebind after the check cannot move the request: it goes to the address checked,
    with the original host in `Host`."""
    lookups = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "receiver.test":
            lookups.append(host)
            # First answer: the receiver. Any later lookup would get an unroutable address.
            address = "127.0.0.1" if len(lookups) == 1 else "10.255.255.1"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with Receiver() as receiver:
        result = send(
            receiver.url(host="receiver.test"), allowed_hosts=["receiver.test"], timeout_s=2
        )
    assert result.ok, result
    assert lookups == ["receiver.test"]
    [request] = receiver.received
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["host"] == f"receiver.test:{receiver.port}"


def test_a_host_rebound_to_a_private_address_is_refused_at_send_time(monkeypatch):
    def getaddrinfo(host, port, *args, **kwargs):
        if host == "hooks.example.com":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with Receiver() as receiver:
        result = send(receiver.url(host="hooks.example.com"), allowed_hosts=())
    assert not result.ok and result.refused
    assert result.status_code is None
    assert result.error.startswith("refused: ")
    assert "127.0.0.1" not in result.error
    assert receiver.received == []


def test_loopback_is_refused_unless_allowed():
    with Receiver() as receiver:
        result = send(receiver.url(), allowed_hosts=())
    assert result.refused and not result.ok
    assert receiver.received == []


def test_redirects_are_not_followed():
    with Receiver() as target:
        redirect = answer(302, headers={"Location": target.url("/elsewhere")})
        with Receiver(redirect) as receiver:
            result = send(receiver.url())
    assert not result.ok
    assert result.status_code == 302
    assert "redirects are not followed" in result.error
    assert len(receiver.received) == 1
    assert target.received == []


@pytest.mark.parametrize("status", [400, 404, 410, 429, 500, 503])
def test_other_statuses_fail(status):
    with Receiver(answer(status, b"no")) as receiver:
        result = send(receiver.url())
    assert not result.ok and not result.refused
    assert result.status_code == status
    assert result.error == f"HTTP {status}"


def test_a_slow_receiver_times_out_quickly():
    def slow(handler, request, index):
        time.sleep(3)
        answer(200)(handler, request, index)

    with Receiver(slow) as receiver:
        started = time.monotonic()
        result = send(receiver.url(), timeout_s=0.5)
        elapsed = time.monotonic() - started
    assert not result.ok
    assert result.status_code is None
    assert result.error.startswith("timeout")
    assert elapsed < 2


def test_a_huge_response_body_is_cut_short():
    sent = []

    def endless(handler, request, index):
        handler.send_response(200)
        handler.send_header("Content-Length", str(10 * 1024**3))
        handler.end_headers()
        block = b"x" * 65536
        while True:  # until the client hangs up
            handler.wfile.write(block)
            sent.append(len(block))

    with Receiver(endless) as receiver:
        started = time.monotonic()
        result = send(receiver.url(), max_response_bytes=4096)
        elapsed = time.monotonic() - started
    assert result.ok and result.status_code == 200
    assert 0 < len(result.body) <= 4096
    assert elapsed < 3


def test_nobody_listening():
    result = send(f"http://127.0.0.1:{free_port()}/hook", timeout_s=2)
    assert not result.ok
    assert result.status_code is None
    assert result.error == "connection failed"


def test_a_malformed_url_is_refused_not_raised():
    result = send("not a url at all")
    assert result.refused and result.error.startswith("refused: ")
