"""Fixtures of the fine-tuning tests."""

import pytest

from tests.gpu_worker.finetune.make_dataset import write_tiny_export


@pytest.fixture(scope="module")
def four_rows(tmp_path_factory):
    """A four-row datagen export: what most training tests fit."""
    return str(write_tiny_export(tmp_path_factory.mktemp("export") / "four", rows=4, seed=0))
