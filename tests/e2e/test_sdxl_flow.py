"""An edit through the real stack on the SDXL family: the same API, queue and worker, a
model whose model_index.json names StableDiffusionXLInstructPix2PixPipeline."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import image_bytes
from tests.e2e.conftest import start_stack
from tests.e2e.test_edit_flow import direct_pipeline_outputs, submit

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sdxl_stack(claim_redis_db, tiny_sdxl_dir, tmp_path_factory):
    stack = start_stack(tmp_path_factory, tiny_sdxl_dir, claim_redis_db())
    yield stack
    stack.api.stop()
    stack.worker.stop()


def test_an_sdxl_edit_through_the_api_matches_the_stock_pipeline(sdxl_stack, tiny_sdxl_dir):
    photo = image_bytes((128, 128))  # a bucket of the tiny model: run as it is
    with sdxl_stack.client() as client:
        (engine,) = client.get("/readyz").json()["engines"]
        assert engine["family"] == "sdxl"
        # The tiny model's own default size, below SDXL's 768 px budget.
        assert engine["resolution"] == 128
        job = submit(
            client,
            photo,
            prompt="print a spiderman logo on it",
            num_inference_steps=4,
            seed=77,
            num_outputs=2,
        )
        done = sdxl_stack.wait_finished(job["id"])
        assert done["status"] == "succeeded", done
        outputs = [
            np.asarray(Image.open(io.BytesIO(client.get(o["url"]).content)))
            for o in done["outputs"]
        ]

    # The stock SDXL InstructPix2Pix pipeline, as its model_index.json names it.
    expected = direct_pipeline_outputs(tiny_sdxl_dir, photo, done["params"])
    assert len(outputs) == len(expected) == 2
    for got, reference in zip(outputs, expected, strict=True):
        assert got.shape == (128, 128, 3)
        assert np.array_equal(got, reference)
