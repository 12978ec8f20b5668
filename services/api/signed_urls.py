"""Short-lived signed URLs for outputs in file storage, as S3 presigns them for S3.

An output URL carries `expires` (Unix seconds) and `signature` (HMAC-SHA256 of the path
and the expiry): whoever holds it may download that one output until it expires, without
a key, as with a presigned S3 URL, so that `<img src>` and plain downloads work. Every API
process (and the webhook worker, which renders jobs too) signs with one secret: the
configured INSTRUCTEDIT_URL_SIGNING_SECRET, or else a random one kept in Redis, made by
whichever process needs it first.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import urlencode

import redis


class UrlSigner:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def shared(
        cls, client: redis.Redis, configured: str | None, namespace: str = "instructedit"
    ) -> UrlSigner:
        if configured:
            return cls(configured.encode())
        key = f"{namespace}:url-signing-secret"
        client.set(key, secrets.token_hex(32), nx=True)
        return cls(client.get(key))

    def _mac(self, path: str, expires: int) -> str:
        return hmac.new(self._secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, path: str, expires_in_s: int) -> str:
        """`path` with the query that lets it be fetched for `expires_in_s` seconds."""
        expires = int(time.time()) + expires_in_s
        return f"{path}?{urlencode({'expires': expires, 'signature': self._mac(path, expires)})}"

    def verify(self, path: str, expires: int | None, signature: str | None) -> bool:
        if expires is None or signature is None or expires < time.time():
            return False
        return hmac.compare_digest(self._mac(path, expires), signature)


class LazySigner:
    """A UrlSigner made on first use (so the API starts while Redis is still down)."""

    def __init__(self, client: redis.Redis, settings) -> None:
        self._client = client
        self._settings = settings
        self._signer: UrlSigner | None = None

    def _get(self) -> UrlSigner:
        if self._signer is None:
            self._signer = UrlSigner.shared(self._client, self._settings.url_signing_secret)
        return self._signer

    def sign(self, path: str, expires_in_s: int) -> str:
        return self._get().sign(path, expires_in_s)

    def verify(self, path: str, expires: int | None, signature: str | None) -> bool:
        return self._get().verify(path, expires, signature)
