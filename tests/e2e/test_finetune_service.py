"""A fine-tune through the running stack: POST /v1/finetunes over HTTP, a real GPU worker
serving the `train` queue trains the tiny model on a datagen export in the stack's
storage, registers the adapter, and an edit runs with it."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from services.common.adapters import AdapterStore
from services.common.datasets import DatasetSpec, RunStatus, RunStore, export_prefix
from services.common.edit_params import EditParams
from tests.conftest import image_bytes
from tests.gpu_worker.finetune.make_dataset import write_tiny_export
from tests.stack import _celery_worker, free_port, service_env

pytestmark = pytest.mark.e2e

TINY_CONFIG = {
    "max_steps": 4,
    "batch_size": 2,
    "checkpoint_every": 2,
    "validation_every": 4,
    "validation_rows": 2,
    "validation_inference_steps": 2,
    "holdout_rows": 2,
    "resolution": 64,
    "log_every": 1,
    "use_8bit_adam": False,
}


def storage_root(stack) -> Path:
    url = urlparse(stack.settings["storage_url"])
    return Path(url.netloc + url.path)


@pytest.fixture(scope="module")
def trainer(stack, tmp_path_factory):
    env = service_env(**{**stack.settings, "worker_metrics_port": str(free_port())})
    logs = tmp_path_factory.mktemp("trainer-logs")
    worker = _celery_worker("services.gpu_worker.celery_worker", "train", "trainer", env, logs)
    try:
        worker.wait_until(lambda: "edit engine ready" in worker.log(), 120, "loaded")
        yield worker
    finally:
        worker.stop()


def succeeded_dataset(stack) -> str:
    runs = RunStore(stack.redis, 3600)
    run, _ = runs.create_or_resume(DatasetSpec(num_rows=8, seed=42), stack.key.id)
    write_tiny_export(storage_root(stack) / export_prefix(run.id), rows=8)
    runs.transition(
        run.id,
        {RunStatus.queued},
        status=RunStatus.succeeded,
        export_prefix=export_prefix(run.id),
    )
    return run.id


def wait_finetune(client: httpx.Client, finetune_id: str, trainer, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/finetunes/{finetune_id}").json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body
        time.sleep(0.2)
    raise TimeoutError(f"fine-tune stuck at {body}\ntrainer log:\n{trainer.log()[-5000:]}")


def test_finetune_makes_an_adapter_that_edits_use(stack, trainer):
    dataset = succeeded_dataset(stack)
    with stack.client() as client:
        reply = client.post("/v1/finetunes", json={"dataset": dataset, "config": TINY_CONFIG})
        assert reply.status_code == 202, reply.text
        finetune_id = reply.json()["id"]
        done = wait_finetune(client, finetune_id, trainer)
        assert done["status"] == "succeeded", f"{done}\n{trainer.log()[-5000:]}"
        assert done["progress"]["step"] == 4 and done["progress"]["total"] == 4
        assert done["progress"]["loss"] is not None
        adapter_id = done["adapter"]
        assert adapter_id == f"ft-{finetune_id[:12]}"

        # The validation renders at step 4, served by signed URL without a key.
        assert done["validation_step"] == 4 and len(done["validation_urls"]) == 2
        render = httpx.get(done["validation_urls"][0], timeout=10)
        assert render.status_code == 200 and render.content.startswith(b"\x89PNG")

        # The adapter is registered for the stack's key, with weights in storage.
        adapter = AdapterStore(stack.redis).get(adapter_id)
        assert adapter is not None and adapter.owner == stack.key.id
        assert adapter.location == f"storage:finetunes/{finetune_id}/adapter"
        weights = storage_root(stack) / adapter.storage_prefix
        assert (weights / "pytorch_lora_weights.safetensors").is_file()
        # The checkpoint went to storage too (for resuming on any worker).
        assert list((storage_root(stack) / f"finetunes/{finetune_id}/checkpoints").iterdir())

        # Finished: cancel is 409.
        assert client.post(f"/v1/finetunes/{finetune_id}/cancel").status_code == 409

        if "adapter" not in EditParams.model_fields:
            pytest.skip("edits take no `adapter` yet: the adapter is registered, not served")
        edit = client.post(
            "/v1/edits",
            files={"image": ("p.png", image_bytes((64, 48)), "image/png")},
            data={
                "prompt": "make the square red",
                "adapter": adapter_id,
                "num_inference_steps": "2",
            },
        )
        assert edit.status_code == 202, edit.text
    job = stack.wait_finished(edit.json()["id"])
    assert job["status"] == "succeeded", f"{job}\n{stack.worker.log()[-5000:]}"
    assert job["params"]["adapter"] == adapter_id
