"""A running stack for end-to-end tests: real Redis, a real prefork Celery worker with the
tiny model, and the API served by uvicorn over real HTTP."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import redis

from services.common.api_keys import CreatedKey, KeyStore
from tests.stack import Service, free_port, service_env, start_api, start_worker


@dataclass
class Stack:
    api: Service
    worker: Service
    base_url: str
    redis: redis.Redis
    settings: dict[str, str]
    # A key made for the tests with `KeyStore.create`, as `keys create` makes one.
    key: CreatedKey | None = None

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key.key}"} if self.key else {}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30, headers=self.auth)

    def wait_for(self, job_id: str, predicate, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                job = c.get(f"/v1/edits/{job_id}").json()
                if predicate(job):
                    return job
                time.sleep(0.05)
        raise TimeoutError(f"job {job_id} stuck at {job}\nworker log:\n{self.worker.log()[-4000:]}")

    def wait_finished(self, job_id: str, timeout: float = 90) -> dict:
        return self.wait_for(
            job_id, lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout
        )


def start_stack(tmp_path_factory, model_dir: str, redis_url: str, **extra: str):
    client = redis.Redis.from_url(redis_url)
    logs = tmp_path_factory.mktemp("logs")
    port = free_port()
    settings = {
        "redis_url": redis_url,
        "storage_url": f"file://{tmp_path_factory.mktemp('storage')}",
        "model": model_dir,
        "device": "cpu",
        # Short leases: a job whose worker was killed is taken over within seconds.
        "job_lease_s": "3",
        # A job whose queue message is lost is sent again within seconds.
        "job_redeliver_after_s": "5",
        "reaper_interval_s": "0.5",
        "worker_metrics_port": str(free_port()),
        # Output URLs are built from this, never from a request's Host header.
        "public_base_url": f"http://127.0.0.1:{port}",
        **extra,
    }
    env = service_env(**settings)
    worker = start_worker(env, logs)
    try:
        api = start_api(env, logs, port)
    except Exception:
        worker.stop()
        raise
    key = KeyStore(client).create("e2e") if settings.get("auth") != "disabled" else None
    stack = Stack(api, worker, f"http://127.0.0.1:{port}", client, settings, key)

    def engine_ready() -> bool:
        return "edit engine ready" in worker.log()

    try:
        worker.wait_until(engine_ready, 120, "loaded")
    except Exception:
        api.stop()
        worker.stop()
        raise
    return stack
