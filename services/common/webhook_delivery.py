"""Webhook deliveries: the SSRF guard, one signed attempt, and the log of attempts.

A job's webhook URL is the client's choice, and the server sends requests to it: without
a guard, a client could make the server call its own network (Redis, the cloud metadata
service at 169.254.169.254, an admin port on localhost). So a URL is accepted only when
every address its host resolves to is public (`check_webhook_url`, at submission), and a
delivery resolves and checks the host again when it is sent, then connects to one of the
addresses it checked (`deliver`): DNS that changes in between (a rebind) cannot redirect
the request. Hosts in `webhook_allowed_hosts` (receivers inside the deployment) skip the
address check.

Deliveries follow the Standard Webhooks specification (https://www.standardwebhooks.com):
headers `webhook-id` (the same on every retry of one delivery), `webhook-timestamp` and
`webhook-signature` (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, made with the API
key's `whsec_` secret); a 2xx answer is a success, anything else is retried (by the
Celery task in services/webhooks/tasks.py), redirects are never followed.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import redis
from pydantic import BaseModel
from standardwebhooks import Webhook

from services.common.webhooks import WebhookEvent

USER_AGENT = "InstructEdit-Webhooks/1.0"
ALLOWED_SCHEMES = ("http", "https")
DEFAULT_MAX_RESPONSE_BYTES = 4096
# The attempts kept per job, newest last.
DELIVERY_LOG_LENGTH = 50

_SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the IPv4 address is the last 32 bits

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookURLRefused(ValueError):
    """A webhook URL the server will not call; the message is one line, fit for a 422."""


# -- the SSRF guard ---------------------------------------------------------------------


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a tunnelling IPv6 address leads to: 6to4 (2002::/16) or NAT64
    (64:ff9b::/96)."""
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(address: str | IPAddress) -> bool:
    """Whether `address` is a global, unicast Internet address: not loopback, private,
    link-local (the metadata service), multicast, unspecified, reserved or shared (CGNAT),
    nor an IPv6 form of one of those (IPv4-mapped, IPv4-compatible, 6to4, NAT64)."""
    if isinstance(address, str):
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # without an IPv6 zone
        except ValueError:
            return False
    else:
        ip = address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # a socket connects to the IPv4 address itself
            return is_public_address(ip.ipv4_mapped)
        embedded = _embedded_ipv4(ip)
        if embedded is not None and not is_public_address(embedded):
            return False
        # IPv4-compatible (::a.b.c.d, deprecated) lies in ::/8, reserved below.
        if ip.is_site_local:
            return False
    if (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_unspecified
        or ip.is_reserved
    ):
        return False
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED_ADDRESS_SPACE:
        return False
    return ip.is_global


@dataclass(frozen=True)
class _Target:
    url: httpx.URL
    host: str  # lower-cased, IDNA-encoded (ASCII); IPv6 without brackets
    port: int


def _parse(url: str) -> _Target:
    """The URL's parts the guard and the delivery use: both read them from one parse."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise WebhookURLRefused("the webhook URL is not a valid URL") from None
    scheme = parsed.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise WebhookURLRefused("the webhook URL must use http or https")
    if parsed.userinfo:
        raise WebhookURLRefused("the webhook URL must not contain a user name or password")
    host = parsed.raw_host.decode("ascii", "replace").lower()
    if not host:
        raise WebhookURLRefused("the webhook URL has no host")
    port = parsed.port or (443 if scheme == "https" else 80)
    if not 1 <= port <= 65535:
        raise WebhookURLRefused("the webhook URL's port is out of range")
    return _Target(parsed, host, port)


def _is_allowed(host: str, allowed_hosts: Sequence[str]) -> bool:
    return host in {h.strip().lower() for h in allowed_hosts}


def resolve_public(host: str, port: int, allowed_hosts: Sequence[str] = ()) -> list[str]:
    """The addresses to connect to for `host`, each of them checked.

    Every address the host resolves to must be public (an attacker's DNS may answer a
    private one among public ones), unless the host is in `allowed_hosts`. Raises
    WebhookURLRefused when the host does not resolve or any address is not public; the
    message names the host as given, never the addresses it resolved to.
    """
    host = host.lower()
    lookup = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = socket.getaddrinfo(lookup, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise WebhookURLRefused(f"the webhook URL's host {host} does not resolve") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise WebhookURLRefused(f"the webhook URL's host {host} does not resolve")
    if _is_allowed(host, allowed_hosts):
        return addresses
    if not all(is_public_address(address) for address in addresses):
        try:
            ipaddress.ip_address(lookup)
        except ValueError:
            message = f"the webhook URL's host {host} resolves to a non-public address"
        else:
            message = f"the webhook URL's address {host} is not a public address"
        raise WebhookURLRefused(message)
    return addresses


def check_webhook_url(url: str, allowed_hosts: Sequence[str] = ()) -> None:
    """Refuse (WebhookURLRefused) a URL the server must not call: a scheme other than
    http(s), no host, a user name or password, or a host that does not resolve or resolves
    to any non-public address (loopback, private, link-local, metadata service, ...),
    unless the host is in `allowed_hosts` (exact, lower-cased match).

    Blocks on DNS (socket.getaddrinfo): call it off the event loop.
    """
    target = _parse(url)
    resolve_public(target.host, target.port, allowed_hosts)


# -- one delivery attempt ---------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryResult:
    """What one attempt got: the receiver's status (None: no response), or why it failed."""

    status_code: int | None
    error: str | None
    duration_ms: int
    # The start of the response body, at most max_response_bytes of it.
    body: bytes = b""
    # The URL was refused by the guard when sending: retrying will not help.
    refused: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.status_code is not None and 200 <= self.status_code < 300


def sign_headers(secret: str, webhook_id: str, payload: str, at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt (its timestamp is `at`)."""
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, at, payload),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def _pinned_url(url: httpx.URL, address: str) -> httpx.URL:
    return url.copy_with(host=address.split("%", 1)[0])


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def _describe(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        kind = type(exc).__name__.removesuffix("Timeout").lower() or "request"
        return f"timeout ({kind})"
    if isinstance(exc, httpx.ConnectError):
        text = str(exc)
        return (
            "TLS handshake failed"
            if "SSL" in text or "CERTIFICATE" in text
            else "connection failed"
        )
    if isinstance(exc, httpx.RemoteProtocolError):
        return "invalid HTTP response"
    return f"request failed ({type(exc).__name__})"


def deliver(
    url: str,
    secret: str,
    webhook_id: str,
    payload: str,
    *,
    allowed_hosts: Sequence[str] = (),
    timeout_s: float = 10.0,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    verify: ssl.SSLContext | bool = True,
) -> DeliveryResult:
    """POST one signed delivery of `payload` (a JSON string) to `url`; never raises for
    what the network or the receiver does.

    The host is resolved and checked again now, and the request goes to a checked address
    itself (the URL's host replaced by it, `Host` and TLS server name the original host, so
    the certificate is verified against the name): no rebind can redirect it. Redirects are
    not followed; at most `max_response_bytes` of the response body are read, and the whole
    attempt (body included) ends after about `timeout_s` per network operation.
    `verify`: httpx's TLS verification (the system's CA bundle by default; tests pass a
    context trusting their own CA).
    """
    started = time.monotonic()
    try:
        target = _parse(url)
        addresses = resolve_public(target.host, target.port, allowed_hosts)
    except WebhookURLRefused as exc:
        return DeliveryResult(None, f"refused: {exc}", _elapsed_ms(started), refused=True)

    headers = sign_headers(secret, webhook_id, payload, datetime.now(UTC))
    headers["host"] = target.url.netloc.decode("ascii")
    extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
    content = payload.encode()
    timeout = httpx.Timeout(timeout_s)
    deadline = started + 2 * timeout_s  # for the body: a receiver trickling it is cut off
    error = "connection failed"
    with httpx.Client(
        timeout=timeout,
        follow_redirects=False,
        verify=verify,
        trust_env=False,  # no proxy from the environment: the request goes where checked
    ) as client:
        for address in addresses:
            request = client.build_request(
                "POST",
                _pinned_url(target.url, address),
                headers=headers,
                content=content,
                extensions=extensions,
            )
            try:
                response = client.send(request, stream=True)
            except httpx.ConnectError as exc:
                error = _describe(exc)
                continue  # nothing was sent: the next address may answer
            except httpx.HTTPError as exc:
                return DeliveryResult(None, _describe(exc), _elapsed_ms(started))
            try:
                body = _read_capped(response, max_response_bytes, deadline)
            except httpx.HTTPError as exc:
                return DeliveryResult(response.status_code, _describe(exc), _elapsed_ms(started))
            finally:
                response.close()
            return DeliveryResult(
                response.status_code,
                _status_error(response.status_code),
                _elapsed_ms(started),
                body=body,
            )
    return DeliveryResult(None, error, _elapsed_ms(started))


def _read_capped(response: httpx.Response, limit: int, deadline: float) -> bytes:
    body = bytearray()
    if limit <= 0:
        return b""
    for chunk in response.iter_raw():
        body += chunk
        if len(body) >= limit or time.monotonic() > deadline:
            break
    return bytes(body[:limit])


def _status_error(status: int) -> str | None:
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return f"HTTP {status}: redirects are not followed"
    return f"HTTP {status}"


# -- the attempt log --------------------------------------------------------------------


class DeliveryAttempt(BaseModel):
    """One attempt of one delivery, as the log keeps it."""

    webhook_id: str
    event: WebhookEvent
    attempt: int  # 1-based, per delivery (webhook_id)
    at: datetime  # when it started, UTC
    status_code: int | None = None
    error: str | None = None
    duration_ms: int = 0
    # No more attempts of this delivery will follow: it succeeded, was given up, or is
    # not retryable.
    final: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.status_code is not None and 200 <= self.status_code < 300


class DeliveryLog:
    """Each job's latest delivery attempts, in a Redis list beside its record, expiring
    `ttl_s` after the last attempt (the job's retention)."""

    def __init__(self, client: redis.Redis, ttl_s: int, namespace: str = "instructedit") -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.namespace = namespace

    def key(self, job_id: str) -> str:
        return f"{self.namespace}:job:{job_id}:webhook-deliveries"

    def record(self, job_id: str, attempt: DeliveryAttempt) -> None:
        key = self.key(job_id)
        with self.redis.pipeline() as pipe:
            pipe.rpush(key, attempt.model_dump_json())
            pipe.ltrim(key, -DELIVERY_LOG_LENGTH, -1)
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def attempts(self, job_id: str) -> list[DeliveryAttempt]:
        """Oldest first."""
        raws = self.redis.lrange(self.key(job_id), 0, -1)
        return [DeliveryAttempt.model_validate_json(raw) for raw in raws]

    def delete(self, job_id: str) -> None:
        self.redis.delete(self.key(job_id))
