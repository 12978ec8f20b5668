"""Which edit engines are loaded, warmed up and serving: a registry in Redis.

Each worker process announces itself after its model is loaded and warmed up, and keeps
the entry alive with a heartbeat; an entry of a dead process expires on its own. The API's
/readyz reports these, so a worker counts as ready only once it can serve at full speed.
"""

from __future__ import annotations

import contextlib
import threading
from datetime import datetime

import redis
from pydantic import BaseModel, ConfigDict

HEARTBEAT_S = 5.0
TTL_S = 3 * HEARTBEAT_S


class EngineInfo(BaseModel):
    """What an edit engine loaded: the worker reports it, /readyz shows it."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    model: str
    # The model family (services/gpu_worker/families): "sd15" or "sdxl". Workers from
    # before the SDXL family did not report it, and served SD 1.5 only.
    family: str = "sd15"
    device: str
    dtype: str
    attention: str
    compiled: bool
    max_batch: int
    # The area budget of its resolution buckets, as a side length (buckets.py).
    resolution: int = 512
    # The batch sizes, in outputs, a compiled UNet runs at (INSTRUCTEDIT_BATCH_BUCKETS,
    # capped); None for an eager one, which runs batches at their own size (and from
    # workers that did not report them).
    batch_buckets: list[int] | None = None
    # Seconds the warm-up at worker start took (compiling every shape, with compile_unet);
    # None before the warm-up, or without one.
    warmup_s: float | None = None
    # Graphs the compiled UNet holds after the warm-up; None when it is not compiled.
    unet_graphs: int | None = None


class EngineStatus(EngineInfo):
    """A worker process whose engine is loaded and warmed up."""

    worker: str
    ready_at: datetime


class WorkerRegistry:
    def __init__(self, client: redis.Redis, namespace: str = "instructedit") -> None:
        self.redis = client
        self.prefix = f"{namespace}:engine:"

    def announce(self, status: EngineStatus) -> None:
        self.redis.set(self.prefix + status.worker, status.model_dump_json(), ex=int(TTL_S))

    def withdraw(self, worker_id: str) -> None:
        self.redis.delete(self.prefix + worker_id)

    def ready_engines(self) -> list[EngineStatus]:
        keys = sorted(self.redis.scan_iter(match=self.prefix + "*", count=100))
        values = self.redis.mget(keys) if keys else []
        # An entry that expired between SCAN and MGET reads as None.
        return [EngineStatus.model_validate_json(v) for v in values if v is not None]

    def keep_announcing(self, status: EngineStatus) -> threading.Event:
        """Announce now and every HEARTBEAT_S in a daemon thread; set the event to stop."""
        stop = threading.Event()
        self.announce(status)

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                # Redis briefly away: the next beat tries again.
                with contextlib.suppress(redis.RedisError):
                    self.announce(status)

        threading.Thread(target=beat, name="engine-heartbeat", daemon=True).start()
        return stop
