"""Which edit engines are loaded, warmed up and serving: a registry in Redis.

Each worker process announces itself after its model is loaded and warmed up, and keeps
the entry alive with a heartbeat; an entry of a dead process expires on its own. The API's
/readyz reports these, so a worker counts as ready only once it can serve at full speed.
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any

import redis

HEARTBEAT_S = 5.0
TTL_S = 3 * HEARTBEAT_S


class WorkerRegistry:
    def __init__(self, client: redis.Redis, namespace: str = "instructedit") -> None:
        self.redis = client
        self.prefix = f"{namespace}:engine:"

    def announce(self, worker_id: str, info: dict[str, Any]) -> None:
        self.redis.set(self.prefix + worker_id, json.dumps(info), ex=int(TTL_S))

    def withdraw(self, worker_id: str) -> None:
        self.redis.delete(self.prefix + worker_id)

    def ready_engines(self) -> list[dict[str, Any]]:
        keys = sorted(self.redis.scan_iter(match=self.prefix + "*", count=100))
        values = self.redis.mget(keys) if keys else []
        return [
            {"worker": key.decode().removeprefix(self.prefix), **json.loads(value)}
            for key, value in zip(keys, values, strict=True)
            if value is not None
        ]

    def keep_announcing(self, worker_id: str, info: dict[str, Any]) -> threading.Event:
        """Announce now and every HEARTBEAT_S in a daemon thread; set the event to stop."""
        stop = threading.Event()
        self.announce(worker_id, info)

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                # Redis briefly away: the next beat tries again.
                with contextlib.suppress(redis.RedisError):
                    self.announce(worker_id, info)

        threading.Thread(target=beat, name="engine-heartbeat", daemon=True).start()
        return stop
