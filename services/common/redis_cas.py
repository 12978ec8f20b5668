"""Compare-and-set of Redis records: the optimistic WATCH / MULTI loop the stores share."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis

T = TypeVar("T")


def compare_and_set(
    client: redis.Redis,
    keys: Sequence[str],
    read: Callable[[Any], T],
    decide: Callable[[T], Any],
    write: Callable[[Any, Any], None],
) -> Any:
    """Watch `keys`, `read(pipe)` the current state, let `decide(current)` say the new one
    (None: write nothing and return None), and `write(pipe, new)` it in one MULTI, unless a
    watched key changed meanwhile: then all of it again. Returns the new state."""
    while True:
        with client.pipeline() as pipe:
            try:
                pipe.watch(*keys)
                updated = decide(read(pipe))
                if updated is None:
                    pipe.unwatch()
                    return None
                pipe.multi()
                write(pipe, updated)
                pipe.execute()
                return updated
            except redis.WatchError:
                time.sleep(0.001)
