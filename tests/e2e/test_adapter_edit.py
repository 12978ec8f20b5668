"""An edit with a LoRA adapter through the real stack: pixel for pixel what diffusers'
pipeline makes after `load_lora_weights` of the same adapter; an edit without it, right
after on the same worker, is still the base model's."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from services.common.adapters import AdapterStore
from services.gpu_worker.adapters import write_tiny_lora
from tests.conftest import image_bytes
from tests.e2e.test_edit_flow import BUCKET, direct_pipeline_outputs, submit
from tests.gpu_worker.lora_helpers import stock_edit_with_lora

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def adapter(stack, tiny_model_dir, tmp_path_factory):
    lora = write_tiny_lora(tiny_model_dir, tmp_path_factory.mktemp("lora") / "t", seed=7)
    store = AdapterStore(stack.redis)
    registered = store.register(str(lora), "t")
    yield registered, lora
    store.remove(registered.id)


def _output(done: dict) -> np.ndarray:
    response = httpx.get(done["outputs"][0]["url"])
    assert response.status_code == 200
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_an_adapter_edit_equals_the_pipeline_with_load_lora_weights(stack, tiny_model_dir, adapter):
    registered, lora = adapter
    photo = image_bytes(BUCKET)
    fields = dict(output_size="model", num_inference_steps=4, seed=77, guidance_scale=6.0)
    with stack.client() as client:
        job = submit(client, photo, adapter=registered.id, **fields)
        assert job["params"]["adapter"] == registered.id
        done = stack.wait_finished(job["id"])
        assert done["status"] == "succeeded", done
        with_adapter = _output(done)
        image = Image.open(io.BytesIO(photo)).convert("RGB")
        (reference,) = stock_edit_with_lora(tiny_model_dir, image, done["params"], lora)
        assert np.array_equal(with_adapter, np.asarray(reference))

        # Right after, on the same worker (the adapter now loaded): without it, the edit
        # is the base model's, as the stock pipeline makes it.
        base = stack.wait_finished(submit(client, photo, **fields)["id"])
        assert base["status"] == "succeeded", base
        without = _output(base)
        (expected,) = direct_pipeline_outputs(tiny_model_dir, photo, base["params"])
        assert np.array_equal(without, expected)
        assert not np.array_equal(without, with_adapter)


def test_an_unknown_adapter_is_refused(stack):
    with stack.client() as client:
        response = client.post(
            "/v1/edits",
            files={"image": ("a.png", image_bytes(), "image/png")},
            data={"prompt": "make it red", "adapter": "no-such-adapter"},
        )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_adapter"
