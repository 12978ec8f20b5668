"""The SSRF guard: which webhook URLs the server refuses to call."""

from __future__ import annotations

import socket

import pytest

from services.common.webhook_delivery import (
    WebhookURLRefused,
    check_webhook_url,
    is_public_address,
    resolve_public,
)

PUBLIC = "93.184.215.14"
real_getaddrinfo = socket.getaddrinfo


def fake_dns(monkeypatch, answers: dict[str, list[str]]) -> list[str]:
    """Resolve the names in `answers` to those addresses; anything else as usual. Returns
    the names looked up, in order."""
    looked_up: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        looked_up.append(host)
        if host in answers:
            return [
                (
                    socket.AF_INET6 if ":" in address else socket.AF_INET,
                    socket.SOCK_STREAM,
                    6,
                    "",
                    (address, port or 0),
                )
                for address in answers[host]
            ]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://hooks.example.com/x", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("javascript:alert(1)", "http or https"),
        ("gopher://127.0.0.1:6379/_FLUSHALL", "http or https"),
        ("http:///path", "no host"),
        ("https://", "no host"),
        ("https://user:secret@hooks.example.com/x", "user name or password"),
        ("https://user@hooks.example.com/x", "user name or password"),
        ("http://127.0.0.1/x", "not a public address"),
        ("http://127.1.2.3:8080/x", "not a public address"),
        ("http://localhost/x", "non-public"),
        ("http://LOCALHOST./x", "localhost."),  # refused either way: unresolved or loopback
        ("http://[::1]/x", "not a public address"),
        ("http://10.0.0.1/x", "not a public address"),
        ("http://172.16.0.1/x", "not a public address"),
        ("http://172.31.255.254/x", "not a public address"),
        ("http://192.168.1.1/x", "not a public address"),
        ("http://169.254.169.254/latest/meta-data/", "not a public address"),
        ("http://[fe80::1]/x", "not a public address"),
        ("http://[fc00::1]/x", "not a public address"),
        ("http://[fd12:3456::1]/x", "not a public address"),
        ("http://224.0.0.1/x", "not a public address"),
        ("http://[ff02::1]/x", "not a public address"),
        ("http://0.0.0.0/x", "not a public address"),
        ("http://[::]/x", "not a public address"),
        ("http://100.64.0.1/x", "not a public address"),
        ("http://240.0.0.1/x", "not a public address"),
        ("http://[::ffff:127.0.0.1]/x", "not a public address"),
        ("http://[::ffff:169.254.169.254]/x", "not a public address"),
        ("http://[::127.0.0.1]/x", "not a public address"),
        ("http://[2002:7f00:1::1]/x", "not a public address"),
        ("http://[64:ff9b::a00:1]/x", "not a public address"),
        ("http://hooks.invalid/x", "does not resolve"),
        ("https://example.com:99999/x", "port"),
    ],
)
def test_refused(url, reason):
    with pytest.raises(WebhookURLRefused) as refused:
        check_webhook_url(url, allowed_hosts=())
    message = str(refused.value)
    assert reason in message
    assert "\n" not in message


def test_a_public_name_resolving_to_a_private_address_is_refused(monkeypatch):
    fake_dns(monkeypatch, {"hooks.example.com": ["10.1.2.3"]})
    with pytest.raises(WebhookURLRefused) as refused:
        check_webhook_url("https://hooks.example.com/x", ())
    # The client learns that, not which internal address its name pointed at.
    assert "hooks.example.com" in str(refused.value)
    assert "10.1.2.3" not in str(refused.value)


def test_every_resolved_address_must_be_public(monkeypatch):
    fake_dns(monkeypatch, {"mixed.example.com": [PUBLIC, "2606:4700::1111", "192.168.0.7"]})
    with pytest.raises(WebhookURLRefused):
        check_webhook_url("https://mixed.example.com/x", ())


def test_public_names_are_accepted(monkeypatch):
    fake_dns(monkeypatch, {"hooks.example.com": [PUBLIC, "2606:4700::1111", PUBLIC]})
    check_webhook_url("https://hooks.example.com/x?token=1", ())
    check_webhook_url("http://hooks.example.com:8080/x", ())
    addresses = resolve_public("hooks.example.com", 443, ())
    assert addresses == [PUBLIC, "2606:4700::1111"]


def test_public_addresses_are_accepted():
    check_webhook_url(f"https://{PUBLIC}/hook", ())
    check_webhook_url("https://[2606:4700::1111]/hook", ())
    check_webhook_url("https://[::ffff:8.8.8.8]/hook", ())


def test_allowed_hosts_may_be_anywhere(monkeypatch):
    fake_dns(monkeypatch, {"receiver.internal": ["10.0.0.9"]})
    check_webhook_url("http://127.0.0.1:9000/x", ["127.0.0.1"])
    check_webhook_url("http://Receiver.Internal/x", ["receiver.internal"])
    assert resolve_public("receiver.internal", 80, ["receiver.internal"]) == ["10.0.0.9"]
    # The match is on the host exactly as written: no suffixes, no other spellings.
    with pytest.raises(WebhookURLRefused):
        check_webhook_url("http://127.0.0.2/x", ["127.0.0.1"])
    with pytest.raises(WebhookURLRefused):
        check_webhook_url("http://localhost/x", ["127.0.0.1"])
    # Still no other schemes or user info on an allowed host, and it must still resolve.
    with pytest.raises(WebhookURLRefused):
        check_webhook_url("ftp://127.0.0.1/x", ["127.0.0.1"])
    with pytest.raises(WebhookURLRefused):
        check_webhook_url("http://a:b@127.0.0.1/x", ["127.0.0.1"])
    with pytest.raises(WebhookURLRefused):
        check_webhook_url("http://gone.invalid/x", ["gone.invalid"])


def test_numeric_spellings_of_loopback_are_refused_by_their_address():
    # Decimal and shortened forms resolve (inet_aton) to 127.0.0.1: refused by address.
    for url in ("http://2130706433/x", "http://127.1/x", "http://0x7f000001/x"):
        with pytest.raises(WebhookURLRefused):
            check_webhook_url(url, ())


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.255.0.1", False),
        ("100.127.255.255", False),
        ("169.254.169.254", False),
        ("192.0.2.1", False),  # documentation
        ("198.18.0.1", False),  # benchmarking
        ("255.255.255.255", False),
        ("fec0::1", False),  # site-local
        ("fe80::1%eth0", False),
        ("not an address", False),
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(address) is public
