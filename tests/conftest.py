"""Shared fixtures: a real Redis database, the tiny offline model, test images."""

from __future__ import annotations

import io
import os

import pytest
import redis
from PIL import Image

TEST_REDIS_URL = os.environ.get("INSTRUCTEDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


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


@pytest.fixture
def redis_url(redis_server) -> str:
    """A Redis database of its own, emptied before the test."""
    url = redis_db_url(14)
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from services.gpu_worker.tiny_model import write_tiny_instruct_pix2pix

    return str(write_tiny_instruct_pix2pix(tmp_path_factory.mktemp("models") / "tiny", seed=0))


def image_bytes(size=(64, 48), mode="RGB", fmt="PNG", color=(200, 30, 30), **save) -> bytes:
    buf = io.BytesIO()
    image = Image.new(mode, size, color if mode in ("RGB", "RGBA") else 128)
    if mode == "RGB":
        # A gradient, so a flipped or rotated image is distinguishable.
        for x in range(size[0]):
            image.putpixel((x, 0), (x * 4 % 256, 0, 0))
    image.save(buf, format=fmt, **save)
    return buf.getvalue()
