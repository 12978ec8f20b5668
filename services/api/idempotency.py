"""`Idempotency-Key` on POSTs: a retried submission returns the job the first one made.

Per key and Idempotency-Key, Redis remembers (for INSTRUCTEDIT_IDEMPOTENCY_TTL_S) the
fingerprint of the request (its path, fields and the SHA-256 of its files) and the id of
the job it creates. The id is reserved before any work, with SET NX, so of concurrent
duplicates exactly one does the work; the others wait for its job to exist and return
it. The same Idempotency-Key with a different request is 422. A submission that fails
releases its reservation, so that a retry can succeed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Annotated, TypeVar

import redis
from fastapi import Header
from pydantic import BaseModel

from services.api.errors import APIError

T = TypeVar("T")

IdempotencyKey = Annotated[
    str | None,
    Header(
        description="Retrying with the same key and the same request within 24 hours "
        "returns what the first request created (200, `Idempotent-Replayed: true`) "
        "instead of a new one; the same key with a different request is 422 "
        "`idempotency_key_reused`"
    ),
]

MAX_KEY_LENGTH = 255
# How long a duplicate waits for the first request's job before it answers 409.
WAIT_FOR_FIRST_S = 30.0
_POLL_S = 0.05

# Delete the reservation only if it is still the one this request made.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Reservation(BaseModel):
    fingerprint: str
    resource_id: str
    # Set once the first request created its resource: a done reservation whose resource
    # is gone (deleted since) is not waited for.
    done: bool = False


def fingerprint(path: str, fields: list[tuple[str, str | bytes]]) -> str:
    """A request's identity: path and every field, files by their SHA-256, in order of
    name (so that field order does not matter)."""
    canonical = [
        [name, hashlib.sha256(value).hexdigest() if isinstance(value, bytes) else value]
        for name, value in sorted(fields, key=lambda item: item[0])
    ]
    return hashlib.sha256(json.dumps([path, canonical]).encode()).hexdigest()


def check_key(key: str) -> str:
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable():
        raise APIError(
            422,
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters",
        )
    return key


class IdempotencyStore:
    def __init__(self, client: redis.Redis, ttl_s: int, namespace: str = "instructedit") -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._ns = namespace
        self._release = client.register_script(_RELEASE)

    def _key(self, owner: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self._ns}:idempotency:{owner}:{digest}"

    def run_once(
        self,
        owner: str,
        key: str,
        request_fingerprint: str,
        new_id: str,
        create: Callable[[str], T],
        find: Callable[[str], T | None],
    ) -> tuple[T, bool]:
        """`create(new_id)` unless this key already made (or is making) a resource for the
        same request: then that one, found with `find(id)` (None: not there yet). Returns
        the resource and whether it was replayed."""
        redis_key = self._key(owner, check_key(key))
        mine = Reservation(fingerprint=request_fingerprint, resource_id=new_id).model_dump_json()
        deadline = time.monotonic() + WAIT_FOR_FIRST_S
        while True:
            if self.redis.set(redis_key, mine, nx=True, ex=self.ttl_s):
                try:
                    created = create(new_id)
                except BaseException:
                    self._release(keys=[redis_key], args=[mine])
                    raise
                done = Reservation(
                    fingerprint=request_fingerprint, resource_id=new_id, done=True
                ).model_dump_json()
                self.redis.set(redis_key, done, xx=True, keepttl=True)
                return created, False
            raw = self.redis.get(redis_key)
            if raw is None:
                continue  # released (the first request failed) or expired just now
            first = Reservation.model_validate_json(raw)
            if first.fingerprint != request_fingerprint:
                raise APIError(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different request",
                )
            found = find(first.resource_id)
            if found is not None:
                return found, True
            if first.done:
                # Made, then deleted: this request makes it anew.
                self._release(keys=[redis_key], args=[raw])
                continue
            if time.monotonic() > deadline:
                raise APIError(
                    409,
                    "idempotency_in_progress",
                    "a request with this Idempotency-Key is still being processed",
                    headers={"Retry-After": "1"},
                )
            time.sleep(_POLL_S)
