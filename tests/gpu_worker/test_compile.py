"""torch.compile of the UNet changes no result, and compiles one graph per padded batch
shape: batches are padded to batch buckets, so sizes in between compile nothing new.

Runs on CPU with the tiny model (inductor's C++ backend). Tolerance: inductor fuses the
UNet's element-wise ops and reorders their float32 arithmetic, so outputs may differ from
the eager pipeline by rounding; after 8-bit quantisation that is at most a level or two on
a few pixels (measured: 1), far below any visible change. A wrong compiled graph (a
dropped guidance branch, a mixed-up sample) moves pixels by tens of levels.
"""

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from services.common.edit_params import EditParams
from services.gpu_worker.engine import EditEngine, EditRequest, EngineOptions
from tests.gpu_worker.test_engine import product_photo, reference

MAX_LEVEL_DIFF = 2

JOBS = [
    EditParams(prompt="make it red", seed=11, num_inference_steps=3),
    EditParams(
        prompt="print a spiderman logo on it",
        negative_prompt="blurry",
        seed=12,
        num_inference_steps=3,
        guidance_scale=9.0,
        image_guidance_scale=1.2,
    ),
    EditParams(prompt="put the ball on sand", seed=13, num_inference_steps=3, num_outputs=2),
]


@pytest.fixture(scope="module")
def compiled_engine(tiny_model_dir):
    # "default": CUDA graphs ("reduce-overhead") need a GPU; the graph and kernels are the same.
    engine = EditEngine(
        tiny_model_dir,
        EngineOptions(device="cpu", compile_unet=True, compile_mode="default", max_batch=4),
    )
    engine.setup()
    return engine


def level_diff(ours, theirs) -> int:
    assert len(ours) == len(theirs)
    return max(
        int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())
        for a, b in zip(ours, theirs, strict=True)
    )


def test_compiled_engine_matches_plain_pipeline_at_every_batch_size(
    compiled_engine, tiny_model_dir
):
    assert compiled_engine.info.compiled is True
    assert compiled_engine.batch_buckets == (1, 2, 4)
    image = product_photo((128, 128))  # a bucket of the tiny model
    graphs_before = counters["stats"]["unique_graphs"]
    calls = []
    hook = compiled_engine.pipe.unet.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0])
    )
    try:
        (alone,) = compiled_engine.predict_batch([EditRequest(image, JOBS[0])])
        assert level_diff(alone, reference(tiny_model_dir, image, JOBS[0])) <= MAX_LEVEL_DIFF

        together = compiled_engine.predict_batch([EditRequest(image, p) for p in JOBS])
        for params, outputs in zip(JOBS, together, strict=True):
            assert len(outputs) == params.num_outputs
            assert level_diff(outputs, reference(tiny_model_dir, image, params)) <= MAX_LEVEL_DIFF
        graphs = counters["stats"]["unique_graphs"]

        # 3 outputs run padded to the bucket of 4: the graph of the batch above, no compile.
        three = compiled_engine.predict_batch(
            [EditRequest(image, JOBS[2]), EditRequest(image, JOBS[0])]
        )
    finally:
        hook.remove()
    assert counters["stats"]["unique_graphs"] == graphs
    assert [len(outputs) for outputs in three] == [2, 1]
    assert level_diff(three[1], alone) <= MAX_LEVEL_DIFF
    # One job alone: 3 branches of 1 output; then 4 outputs; then 3 outputs padded to 4.
    assert calls == [3] * 3 + [12] * 3 + [12] * 3
    # Static shapes, one graph each: 3 and 12 samples (fewer when an engine compiled
    # earlier in this process already holds one: dynamo reuses it).
    assert counters["stats"]["unique_graphs"] - graphs_before <= 2


def test_compiled_engine_really_runs_a_compiled_unet(compiled_engine):
    unet = compiled_engine.pipe.unet
    assert isinstance(unet, torch._dynamo.eval_frame.OptimizedModule)
