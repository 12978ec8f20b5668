"""HTTPS deliveries go to the checked address, and verify the certificate against the
URL's host name (sent as SNI), not against the address."""

from __future__ import annotations

import datetime as dt
import socket
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.common.api_keys import new_webhook_secret
from services.common.webhook_delivery import deliver
from tests.webhooks import Receiver

real_getaddrinfo = socket.getaddrinfo


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject, issuer, public_key, signing_key, names, ca: bool):
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, and a server certificate from it for `receiver.test` (and nothing else)."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(
        _name("test CA"), _name("test CA"), ca_key.public_key(), ca_key, None, ca=True
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("receiver.test")]
    cert = _certificate(_name("receiver.test"), ca.subject, key.public_key(), ca_key, names, False)
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return cert_file, key_file, client


@pytest.fixture
def https_receiver(pki, monkeypatch):
    cert_file, key_file, _ = pki
    server_names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)

    def getaddrinfo(host, port, *args, **kwargs):
        if host in ("receiver.test", "alias.test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with Receiver() as receiver:
        receiver.server.socket = context.wrap_socket(receiver.server.socket, server_side=True)
        yield receiver, server_names


def test_https_verifies_the_host_name_of_the_pinned_address(pki, https_receiver):
    receiver, server_names = https_receiver
    url = f"https://receiver.test:{receiver.port}/hook"
    result = deliver(
        url,
        new_webhook_secret(),
        "msg_tls",
        "{}",
        allowed_hosts=["receiver.test"],
        timeout_s=5,
        verify=pki[2],
    )
    assert result.ok, result
    assert server_names == ["receiver.test"]
    [request] = receiver.received
    assert {k.lower(): v for k, v in request.headers.items()}["host"] == (
        f"receiver.test:{receiver.port}"
    )


def test_a_certificate_for_another_name_fails(pki, https_receiver):
    receiver, _ = https_receiver
    result = deliver(
        f"https://alias.test:{receiver.port}/hook",
        new_webhook_secret(),
        "msg_tls",
        "{}",
        allowed_hosts=["alias.test"],
        timeout_s=5,
        verify=pki[2],
    )
    assert not result.ok and result.status_code is None
    assert result.error == "TLS handshake failed"
    assert receiver.received == []


def test_the_address_is_not_what_is_verified(pki, https_receiver):
    """Connecting by address does not weaken verification: the certificate names no
    address, and the request to the URL's name still succeeds (above)."""
    receiver, _ = https_receiver
    result = deliver(
        f"https://127.0.0.1:{receiver.port}/hook",
        new_webhook_secret(),
        "msg_tls",
        "{}",
        allowed_hosts=["127.0.0.1"],
        timeout_s=5,
        verify=pki[2],
    )
    assert result.error == "TLS handshake failed"
