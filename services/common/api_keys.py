"""API keys: who a request acts for.

A key reads `ie_<id>_<secret>`: the id names its record, the secret (32 random bytes) is
known only to the client. Redis keeps the SHA-256 of the whole key, never the key, and a
presented key is checked by comparing digests in constant time. (A slow password hash
would add nothing: the secret is random, not chosen by a person.)

Each key also has a webhook signing secret in the Standard Webhooks `whsec_` format: the
server must sign with it, so it is stored as it is, and shown once at creation.

Jobs and dataset runs belong to the key id that created them. With auth disabled (local
development), every request acts as LOCAL_KEY_ID.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from datetime import UTC, datetime

import redis
from pydantic import BaseModel

KEY_PREFIX = "ie"
LOCAL_KEY_ID = "local"


class ApiKey(BaseModel):
    """A key's record, without its secret."""

    id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class CreatedKey(BaseModel):
    """What `keys create` prints: the only time the key and its webhook secret are shown."""

    id: str
    name: str
    key: str
    webhook_secret: str


class KeyNotFound(KeyError):
    pass


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _key_id(key: str) -> str | None:
    """The id a presented key claims, or None when it is not shaped like one of ours."""
    prefix, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or not key_id or not secret or len(key) > 200:
        return None
    return key_id if all(c in "0123456789abcdef" for c in key_id) else None


class KeyStore:
    def __init__(self, client: redis.Redis, namespace: str = "instructedit") -> None:
        self.redis = client
        self._ns = namespace
        self._index = f"{namespace}:api-keys"

    def _key(self, key_id: str) -> str:
        return f"{self._ns}:api-key:{key_id}"

    def create(self, name: str) -> CreatedKey:
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        created = CreatedKey(id=key_id, name=name, key=key, webhook_secret=new_webhook_secret())
        now = datetime.now(UTC)
        with self.redis.pipeline() as pipe:
            pipe.hset(
                self._key(key_id),
                mapping={
                    "name": name,
                    "digest": _digest(key),
                    "webhook_secret": created.webhook_secret,
                    "created_at": now.isoformat(),
                },
            )
            pipe.zadd(self._index, {key_id: now.timestamp()})
            pipe.execute()
        return created

    def authenticate(self, key: str) -> ApiKey | None:
        """The active key `key` is, or None (unknown, malformed, wrong secret, revoked)."""
        key_id = _key_id(key)
        if key_id is None:
            return None
        fields = self.redis.hgetall(self._key(key_id))
        if not fields or b"digest" not in fields:
            return None
        if not hmac.compare_digest(fields[b"digest"].decode(), _digest(key)):
            return None
        record = self._record(key_id, fields)
        return record if record.active else None

    def get(self, key_id: str) -> ApiKey:
        fields = self.redis.hgetall(self._key(key_id))
        if not fields:
            raise KeyNotFound(key_id)
        return self._record(key_id, fields)

    def list(self) -> list[ApiKey]:
        """Every key, oldest first (revoked ones too, marked)."""
        ids = [i.decode() for i in self.redis.zrange(self._index, 0, -1)]
        with self.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(self._key(key_id))
            records = pipe.execute()
        return [self._record(i, f) for i, f in zip(ids, records, strict=True) if f]

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key: it stops working with the next request (nothing caches keys).
        Revoking a revoked key keeps its first revocation time."""
        if not self.redis.exists(self._key(key_id)) or key_id == LOCAL_KEY_ID:
            raise KeyNotFound(key_id)
        self.redis.hsetnx(self._key(key_id), "revoked_at", datetime.now(UTC).isoformat())
        return self.get(key_id)

    def webhook_secret(self, key_id: str) -> str:
        """The key's webhook signing secret; the local caller's is made on first use."""
        if key_id == LOCAL_KEY_ID:
            self.redis.hsetnx(self._key(key_id), "webhook_secret", new_webhook_secret())
        raw = self.redis.hget(self._key(key_id), "webhook_secret")
        if raw is None:
            raise KeyNotFound(key_id)
        return raw.decode()

    @staticmethod
    def _record(key_id: str, fields: dict[bytes, bytes]) -> ApiKey:
        revoked = fields.get(b"revoked_at")
        return ApiKey(
            id=key_id,
            name=fields.get(b"name", b"").decode(),
            created_at=datetime.fromisoformat(fields[b"created_at"].decode()),
            revoked_at=datetime.fromisoformat(revoked.decode()) if revoked else None,
        )
