"""The engine registry behind /readyz, on a real Redis."""

import time
from datetime import UTC, datetime

import redis

from services.common import workers
from services.common.workers import EngineInfo, EngineStatus, WorkerRegistry

INFO = EngineInfo(
    model="timbrooks/instruct-pix2pix",
    family="sd15",
    device="cuda:0",
    dtype="float16",
    attention="sdpa",
    compiled=True,
    max_batch=8,
)


def status(worker: str) -> EngineStatus:
    return EngineStatus(**INFO.model_dump(), worker=worker, ready_at=datetime.now(UTC))


def test_announced_engines_are_listed_with_what_they_loaded(redis_url):
    registry = WorkerRegistry(redis.Redis.from_url(redis_url))
    assert registry.ready_engines() == []
    registry.announce(status("gpu-b:12"))
    registry.announce(status("gpu-a:7"))
    engines = registry.ready_engines()
    assert [e.worker for e in engines] == ["gpu-a:7", "gpu-b:12"]
    assert EngineInfo(**engines[0].model_dump(exclude={"worker", "ready_at"})) == INFO
    registry.withdraw("gpu-a:7")
    assert [e.worker for e in registry.ready_engines()] == ["gpu-b:12"]


def test_an_engine_that_stops_beating_expires(redis_url):
    client = redis.Redis.from_url(redis_url)
    WorkerRegistry(client).announce(status("gpu-a:7"))
    ttl = client.ttl("instructedit:engine:gpu-a:7")
    assert 0 < ttl <= workers.TTL_S


def test_heartbeat_keeps_the_entry_until_stopped(redis_url, monkeypatch):
    monkeypatch.setattr(workers, "HEARTBEAT_S", 0.05)
    client = redis.Redis.from_url(redis_url)
    registry = WorkerRegistry(client)
    stop = registry.keep_announcing(status("gpu-a:7"))
    try:
        client.delete("instructedit:engine:gpu-a:7")  # as if it had expired
        deadline = time.monotonic() + 5
        while not registry.ready_engines() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [e.worker for e in registry.ready_engines()] == ["gpu-a:7"]
    finally:
        stop.set()
    time.sleep(0.2)
    client.delete("instructedit:engine:gpu-a:7")
    time.sleep(0.2)
    assert registry.ready_engines() == []  # no beat after stop
