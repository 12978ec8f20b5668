import pytest
import redis

from services.common.jobs import JobStore
from services.common.storage import FileStorage
from services.gpu_worker.engine import EditEngine, EngineOptions


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    engine = EditEngine(tiny_model_dir, EngineOptions(device="cpu"))
    engine.setup()
    return engine


@pytest.fixture
def jobs(redis_url):
    return JobStore(redis.Redis.from_url(redis_url), ttl_s=300)


@pytest.fixture
def storage(tmp_path):
    return FileStorage(tmp_path / "storage")
