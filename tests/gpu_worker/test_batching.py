"""Dynamic batching in the engine: jobs sharing a UNet call get what they would get alone.

Tolerance: on CPU, PyTorch's GEMM and convolution kernels choose their blocking by batch
size, so a sample's UNet output in a batch of 3N differs from the same sample in a batch
of 3 by float32 rounding (~1e-6, measured). Everything else (noise, scheduler state,
guidance) is per job and exact. After 6 steps and 8-bit quantisation this shows as at
most one intensity level on a few pixels; a batch of one is bit-identical to the stock
pipeline (tests/gpu_worker/test_engine.py).
"""

import numpy as np
import pytest
from PIL import Image

from services.common.buckets import bucket_for
from services.common.edit_params import EditParams
from services.gpu_worker.engine import EditRequest, LeaveBatch


def photo(size, seed):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    # As the worker does: at the tiny model's bucket (its budget is 128 px).
    return image.resize(bucket_for(*size, 128), Image.Resampling.LANCZOS)


# Different originals that land in one resolution bucket (128x128 after resizing).
ORIGINALS = [(64, 48), (128, 96), (200, 150), (68, 51)]
PARAMS = [
    EditParams(prompt="make it red", seed=1, num_inference_steps=6, num_outputs=2),
    EditParams(
        prompt="print a spiderman logo on it",
        negative_prompt="blurry",
        seed=2,
        num_inference_steps=6,
        guidance_scale=9.0,
        image_guidance_scale=1.2,
    ),
    EditParams(
        prompt="put the ball on sand",
        seed=3,
        num_inference_steps=6,
        guidance_scale=3.0,
        image_guidance_scale=2.0,
        num_outputs=3,
    ),
    EditParams(prompt="make it red", seed=4, num_inference_steps=6),
]


def assert_close(batched, alone):
    assert len(batched) == len(alone)
    for a, b in zip(batched, alone, strict=True):
        diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        assert diff.max() <= 1, diff.max()
        assert (diff > 0).mean() < 0.01


@pytest.fixture(scope="module")
def requests_and_alone(engine):
    images = [photo(size, i) for i, size in enumerate(ORIGINALS)]
    assert {im.size for im in images} == {(128, 128)}
    alone = [engine.predict(im, p) for im, p in zip(images, PARAMS, strict=True)]
    return images, alone


def test_batched_jobs_match_jobs_run_alone(engine, requests_and_alone):
    images, alone = requests_and_alone
    calls = []
    hook = engine.pipe.unet.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0])
    )
    try:
        batched = engine.predict_batch(
            [EditRequest(im, p) for im, p in zip(images, PARAMS, strict=True)]
        )
    finally:
        hook.remove()
    # One UNet call per step, three guidance branches for each of the 7 outputs.
    assert calls == [3 * 7] * 6
    for got, expected in zip(batched, alone, strict=True):
        assert_close(got, expected)


def test_batches_are_deterministic(engine, requests_and_alone):
    images, _ = requests_and_alone
    requests = [EditRequest(im, p) for im, p in zip(images, PARAMS, strict=True)]
    first = engine.predict_batch(requests)
    second = engine.predict_batch(requests)
    for a_job, b_job in zip(first, second, strict=True):
        for a, b in zip(a_job, b_job, strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_canceled_job_leaves_the_batch_others_go_on(engine, requests_and_alone):
    images, alone = requests_and_alone
    seen = []

    class Canceled(LeaveBatch):
        pass

    def cancel_at_two(step, total):
        seen.append(step)
        if step == 2:
            raise Canceled

    calls = []
    hook = engine.pipe.unet.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0])
    )
    requests = [EditRequest(im, p) for im, p in zip(images, PARAMS, strict=True)]
    requests[1] = EditRequest(images[1], PARAMS[1], on_step=cancel_at_two)
    try:
        outcomes = engine.predict_batch(requests)
    finally:
        hook.remove()
    assert isinstance(outcomes[1], Canceled)
    assert seen == [1, 2]
    # After the cancel the batch shrinks by that job's three branches.
    assert calls == [21, 21, 18, 18, 18, 18]
    for index in (0, 2, 3):
        assert_close(outcomes[index], alone[index])


def test_jobs_without_guidance_batch_separately(engine):
    plain = EditParams(
        prompt="x", num_inference_steps=2, guidance_scale=1.0, image_guidance_scale=1.0
    )
    guided = EditParams(prompt="x", num_inference_steps=2)
    image = photo((64, 48), 0)
    with pytest.raises(ValueError, match="batch key"):
        engine.predict_batch([EditRequest(image, plain), EditRequest(image, guided)])
    (outputs,) = engine.predict_batch([EditRequest(image, plain)])
    assert len(outputs) == 1


def test_mismatched_sizes_are_refused(engine):
    params = EditParams(prompt="x", num_inference_steps=2)
    with pytest.raises(ValueError, match="batch key"):
        engine.predict_batch(
            [EditRequest(photo((64, 48), 0), params), EditRequest(photo((300, 70), 0), params)]
        )


def test_text_embeddings_are_cached(engine):
    engine._embeds.clear()
    image = photo((64, 48), 0)
    params = EditParams(prompt="make it blue", num_inference_steps=1, seed=5)
    first = engine.predict(image, params)
    assert ("make it blue", None, True) in engine._embeds
    again = engine.predict(image, params)
    assert len(engine._embeds) == 1
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0]))
