"""Shared fixtures: a real Redis database, the tiny offline model, test images."""

from __future__ import annotations

import io
import os
import uuid

import pytest
import redis
from PIL import Image

TEST_REDIS_URL = os.environ.get("INSTRUCTEDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CLAIM_KEY = "instructedit:test-claim"
# Database 0 is what `make run` uses by default; tests never touch it.
TEST_DBS = range(1, 16)


def redis_db_url(db: int) -> str:
    base, _, _ = TEST_REDIS_URL.rpartition("/")
    return f"{base}/{db}"


@pytest.fixture(scope="session")
def redis_server() -> str:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"tests need Redis at {TEST_REDIS_URL} (start redis-server): {exc}")
    return TEST_REDIS_URL


@pytest.fixture(scope="session")
def claim_redis_db(redis_server):
    """Hand out Redis databases that no other test session is using, emptied.

    Two pytest runs on one machine (or a developer's `make run`) must never consume each
    other's queues, so each database is claimed with a key that only this session owns.
    """
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    claimed: list[redis.Redis] = []

    def claim() -> str:
        for db in TEST_DBS:
            url = redis_db_url(db)
            client = redis.Redis.from_url(url)
            if client.set(CLAIM_KEY, token, nx=True, ex=3600):
                client.flushdb()
                client.set(CLAIM_KEY, token, ex=3600)
                claimed.append(client)
                return url
        pytest.fail("no free Redis database for this test session (all 15 claimed)")

    yield claim
    for client in claimed:
        if client.get(CLAIM_KEY) == token.encode():
            client.flushdb()


@pytest.fixture(scope="session")
def _function_db(claim_redis_db) -> str:
    return claim_redis_db()


@pytest.fixture
def redis_url(_function_db) -> str:
    """A Redis database of this session's, emptied before the test."""
    client = redis.Redis.from_url(_function_db)
    token = client.get(CLAIM_KEY)
    client.flushdb()
    client.set(CLAIM_KEY, token, ex=3600)
    return _function_db


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from services.gpu_worker.tiny_model import write_tiny_instruct_pix2pix

    return str(write_tiny_instruct_pix2pix(tmp_path_factory.mktemp("models") / "tiny", seed=0))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    from services.gpu_worker.tiny_model import write_tiny_sdxl_instruct_pix2pix

    directory = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    return str(write_tiny_sdxl_instruct_pix2pix(directory, seed=0))


@pytest.fixture(scope="session")
def stack(claim_redis_db, tiny_model_dir, tmp_path_factory):
    """One running stack for the session (tests/e2e/conftest.py): its end-to-end tests,
    the SDK's, the CLI's and the web page's share it."""
    from tests.e2e.conftest import start_stack

    stack = start_stack(tmp_path_factory, tiny_model_dir, claim_redis_db())
    yield stack
    stack.api.stop()
    stack.worker.stop()


def image_bytes(size=(64, 48), mode="RGB", fmt="PNG", color=(200, 30, 30), **save) -> bytes:
    buf = io.BytesIO()
    image = Image.new(mode, size, color if mode in ("RGB", "RGBA") else 128)
    if mode == "RGB":
        # A gradient, so a flipped or rotated image is distinguishable.
        for x in range(size[0]):
            image.putpixel((x, 0), (x * 4 % 256, 0, 0))
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


@pytest.fixture
def decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image Pillow decodes during the test, in order."""
    from PIL import ImageFile

    sizes: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return sizes
