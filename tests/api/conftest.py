import pytest
import redis
from fastapi.testclient import TestClient

from services.api.main import create_app
from services.common.api_keys import KeyStore
from services.common.settings import Settings
from services.common.storage import FileStorage


@pytest.fixture
def settings(redis_url, tmp_path) -> Settings:
    return Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path}/storage",
        max_upload_bytes=200_000,
    )


def keyed_client(app) -> TestClient:
    """A TestClient of `app` that sends a new API key with every request."""
    client = TestClient(app)
    key = create_key(app, "tests")
    client.headers["Authorization"] = f"Bearer {key.key}"
    client.key_id = key.id  # the owner of what this client creates
    return client


def create_key(app, name: str):
    return KeyStore(app.state.redis).create(name)


@pytest.fixture
def client(settings):
    """The ASGI app over httpx, with a real Redis and no worker consuming the queue; every
    request carries an API key of its own."""
    with keyed_client(create_app(settings)) as c:
        yield c


@pytest.fixture
def queue_len(settings):
    r = redis.Redis.from_url(settings.redis_url)
    return lambda: r.llen("edits")


@pytest.fixture
def job_keys(settings):
    r = redis.Redis.from_url(settings.redis_url)
    return lambda: r.keys("instructedit:job:*")


@pytest.fixture
def stored(settings, tmp_path):
    return lambda: FileStorage(tmp_path / "storage").list("")
