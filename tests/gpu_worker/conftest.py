import pytest

from services.gpu_worker.engine import EditEngine, EngineOptions


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    engine = EditEngine(tiny_model_dir, EngineOptions(device="cpu"))
    engine.setup()
    return engine
