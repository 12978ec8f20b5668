"""LoRA adapters an edit may run with (`adapter` of POST /v1/edits): a small Redis store.

An adapter is a diffusers-format LoRA: a folder holding `pytorch_lora_weights.safetensors`
(what `save_lora_weights` writes). Its `location` is either

- a local directory (an absolute path, or a `file://` URL), which every worker must be
  able to read, or
- `storage:<prefix>`: the key prefix in the service's storage (INSTRUCTEDIT_STORAGE_URL)
  under which the weights file lies (`<prefix>/pytorch_lora_weights.safetensors`);
  workers download it to a local cache before loading it.

Adapters registered by an operator (`python -m services.api adapters register`) have no
owner and are usable by every key; those a key's fine-tune makes belong to that key
(`owner` is its id) and are visible to it alone. Each registration gets a fresh
`revision`, so a worker never runs stale weights of an id registered again.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from pathlib import Path

import redis
from pydantic import BaseModel

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
STORAGE_SCHEME = "storage:"
ADAPTER_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
ADAPTER_ID_MAX_LENGTH = 64
_ID = re.compile(ADAPTER_ID_PATTERN)


class Adapter(BaseModel):
    id: str
    name: str
    location: str
    owner: str | None = None
    revision: str
    created_at: datetime

    def visible_to(self, key_id: str | None) -> bool:
        """Whether a request acting for `key_id` may use it."""
        return self.owner is None or self.owner == key_id

    @property
    def storage_prefix(self) -> str | None:
        """The storage key prefix of a `storage:` location; None for a local one."""
        if self.location.startswith(STORAGE_SCHEME):
            return self.location.removeprefix(STORAGE_SCHEME).strip("/")
        return None


class AdapterInvalid(ValueError):
    """A registration that cannot be accepted (bad id, no weights file, id taken)."""


class AdapterNotFound(KeyError):
    pass


def valid_adapter_id(adapter_id: str) -> bool:
    return bool(_ID.fullmatch(adapter_id))


def local_path(location: str) -> Path | None:
    """The directory of a local location; None for a storage one."""
    if location.startswith(STORAGE_SCHEME):
        return None
    return Path(location.removeprefix("file://"))


class AdapterStore:
    """Adapters by id: a hash per adapter and an index sorted by registration time."""

    def __init__(self, client: redis.Redis, storage=None, namespace: str = "instructedit") -> None:
        self.redis = client
        # To check that a `storage:` location holds the weights (unchecked without it).
        self.storage = storage
        self._ns = namespace
        self._index = f"{namespace}:adapters"

    def _key(self, adapter_id: str) -> str:
        return f"{self._ns}:adapter:{adapter_id}"

    def register(
        self,
        location: str,
        name: str,
        adapter_id: str | None = None,
        owner: str | None = None,
    ) -> Adapter:
        """Record an adapter. `location`: a local directory or `storage:<prefix>` holding
        `pytorch_lora_weights.safetensors`. Without `adapter_id`, a random one is made.
        Raises AdapterInvalid when the id is malformed or taken, or the weights are not
        there."""
        location = self._checked_location(location)
        if adapter_id is None:
            adapter_id = secrets.token_hex(6)
        if not valid_adapter_id(adapter_id):
            raise AdapterInvalid(
                f"adapter id {adapter_id!r} must be 1-64 of a-z, 0-9, '_' and '-', "
                "starting with a letter or digit"
            )
        now = datetime.now(UTC)
        adapter = Adapter(
            id=adapter_id,
            name=name,
            location=location,
            owner=owner,
            revision=secrets.token_hex(4),
            created_at=now,
        )
        fields = {
            "name": name,
            "location": location,
            "revision": adapter.revision,
            "created_at": now.isoformat(),
        }
        if owner is not None:
            fields["owner"] = owner
        key = self._key(adapter_id)
        # Claimed atomically: a second registration of the id is refused.
        if not self.redis.hsetnx(key, "created_at", fields["created_at"]):
            raise AdapterInvalid(f"an adapter with id {adapter_id!r} already exists")
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping=fields)
            pipe.zadd(self._index, {adapter_id: now.timestamp()})
            pipe.execute()
        return adapter

    def _checked_location(self, location: str) -> str:
        if location.startswith(STORAGE_SCHEME):
            prefix = location.removeprefix(STORAGE_SCHEME).strip("/")
            if not prefix:
                raise AdapterInvalid("a storage location needs a key prefix: storage:<prefix>")
            if self.storage is not None and not self.storage.exists(f"{prefix}/{WEIGHTS_FILE}"):
                raise AdapterInvalid(f"storage has no {prefix}/{WEIGHTS_FILE}")
            return f"{STORAGE_SCHEME}{prefix}"
        directory = local_path(location)
        if not directory.is_dir():
            raise AdapterInvalid(f"{location} is not a directory")
        if not (directory / WEIGHTS_FILE).is_file():
            raise AdapterInvalid(f"{location} has no {WEIGHTS_FILE}")
        return str(directory.resolve())

    def get(self, adapter_id: str) -> Adapter | None:
        if not valid_adapter_id(adapter_id):
            return None
        fields = self.redis.hgetall(self._key(adapter_id))
        if not fields or b"location" not in fields:
            return None
        return self._record(adapter_id, fields)

    def list(self, owner: str | None = None, all_owners: bool = True) -> list[Adapter]:
        """Every adapter, oldest first; with `all_owners=False`, those visible to `owner`."""
        ids = [i.decode() for i in self.redis.zrange(self._index, 0, -1)]
        with self.redis.pipeline(transaction=False) as pipe:
            for adapter_id in ids:
                pipe.hgetall(self._key(adapter_id))
            records = pipe.execute()
        adapters = [
            self._record(i, f) for i, f in zip(ids, records, strict=True) if f and b"location" in f
        ]
        if all_owners:
            return adapters
        return [adapter for adapter in adapters if adapter.visible_to(owner)]

    def remove(self, adapter_id: str) -> Adapter:
        """Forget an adapter (its weights stay where they are). Jobs queued with it fail
        with `model_unavailable`."""
        adapter = self.get(adapter_id)
        if adapter is None:
            raise AdapterNotFound(adapter_id)
        with self.redis.pipeline() as pipe:
            pipe.delete(self._key(adapter_id))
            pipe.zrem(self._index, adapter_id)
            pipe.execute()
        return adapter

    @staticmethod
    def _record(adapter_id: str, fields: dict[bytes, bytes]) -> Adapter:
        owner = fields.get(b"owner")
        return Adapter(
            id=adapter_id,
            name=fields.get(b"name", b"").decode(),
            location=fields[b"location"].decode(),
            owner=owner.decode() if owner else None,
            revision=fields.get(b"revision", b"0").decode(),
            created_at=datetime.fromisoformat(fields[b"created_at"].decode()),
        )
