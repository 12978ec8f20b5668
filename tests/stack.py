"""Starting the real services as processes for tests: a Celery worker and the API server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSTRUCTEDIT_")}
    env.update({f"INSTRUCTEDIT_{k.upper()}": str(v) for k, v in settings.items()})
    env["PYTHONPATH"] = str(ROOT)
    # No test may reach a model hub.
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Service:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not {what} after {timeout}s:\n{self.log()[-5000:]}")

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _celery_worker(
    app: str, queue: str, name: str, env, log_dir: Path, pool: tuple[str, str] = ("prefork", "1")
) -> Service:
    """A Celery worker started exactly as production starts it (prefork, one process)."""
    argv = [
        str(BIN / "celery"),
        "--app",
        app,
        "worker",
        "--queues",
        queue,
        "--pool",
        pool[0],
        "--concurrency",
        pool[1],
        "--loglevel",
        "INFO",
        "--hostname",
        f"{name}-{os.getpid()}@%h",
        "--without-mingle",
        "--without-gossip",
    ]
    return Service(name, argv, env, log_dir)


def start_worker(env: dict[str, str], log_dir: Path, name: str = "worker") -> Service:
    return _celery_worker("services.gpu_worker.celery_worker", "edits", name, env, log_dir)


def start_webhooks_worker(env: dict[str, str], log_dir: Path) -> Service:
    """The webhook worker as compose runs it: threads, several deliveries at once."""
    return _celery_worker(
        "services.webhooks.tasks", "webhooks", "webhooks", env, log_dir, pool=("threads", "4")
    )


def start_api(env: dict[str, str], log_dir: Path, port: int) -> Service:
    argv = [
        str(BIN / "uvicorn"),
        "services.api.main:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    service = Service("api", argv, env, log_dir)

    def answers() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    service.wait_until(answers, 60, "answering")
    return service


def start_datagen_worker(env: dict[str, str], log_dir: Path, name: str = "datagen") -> Service:
    return _celery_worker("services.datagen.celery_worker", "datagen", name, env, log_dir)
