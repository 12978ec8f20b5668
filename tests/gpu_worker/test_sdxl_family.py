"""The SDXL InstructPix2Pix family against diffusers' stock SDXL pipeline, on the tiny
SDXL model, on CPU: the same batching engine as SD 1.5, another model behind the seam."""

import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionXLInstructPix2PixPipeline

from services.common.diffusion import ModelUnavailable
from services.common.edit_params import EditParams
from services.gpu_worker.engine import EditEngine, EditRequest, EngineOptions
from tests.gpu_worker.test_batching import assert_close, photo
from tests.gpu_worker.test_engine import product_photo
from tests.reference import stock_edit


@pytest.fixture(scope="module")
def sdxl_engine(tiny_sdxl_dir):
    engine = EditEngine(tiny_sdxl_dir, EngineOptions(device="cpu"))
    engine.setup()
    return engine


def test_the_engine_serves_sdxl_from_model_index(sdxl_engine, tiny_sdxl_dir):
    assert sdxl_engine.info.family == "sdxl"
    assert type(sdxl_engine.pipe) is StableDiffusionXLInstructPix2PixPipeline
    assert sdxl_engine.pipe.watermark is None  # product photos come back unmarked


@pytest.mark.parametrize(
    "prompt,negative,seed,num_outputs,guidance,image_guidance,size",
    [
        ("print a spiderman logo on it", None, 1234, 1, 7.5, 1.5, (64, 48)),
        ("change its color to grey", "blurry", 99, 2, 6.0, 1.3, (64, 48)),
        ("put the shoe on sand", None, 2**32 - 1, 1, 12.0, 2.5, (48, 80)),
        # Both scales 1: the first branch alone. (Where InstructPix2Pix's guidance rule
        # and the stock SDXL pipeline's differ, S_T <= 1 or S_I < 1, its __call__ cannot be
        # made to follow the paper's; tests/gpu_worker/test_engine.py checks those scales
        # on SD 1.5 through the same loop.)
        ("make it black", None, 5, 1, 1.0, 1.0, (64, 64)),
        ("make it black", "low quality", 5, 2, 7.5, 1.0, (64, 48)),
    ],
)
def test_a_job_alone_is_identical_to_the_stock_sdxl_pipeline(
    sdxl_engine, tiny_sdxl_dir, prompt, negative, seed, num_outputs, guidance, image_guidance, size
):
    params = EditParams(
        prompt=prompt,
        negative_prompt=negative,
        num_inference_steps=4,
        guidance_scale=guidance,
        image_guidance_scale=image_guidance,
        seed=seed,
        num_outputs=num_outputs,
    )
    image = product_photo(size)
    ours = sdxl_engine.predict(image, params)
    theirs = stock_edit(tiny_sdxl_dir, image, params)
    assert len(ours) == len(theirs) == num_outputs
    for a, b in zip(ours, theirs, strict=True):
        assert a.size == size
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).std() > 0  # a picture, not a blank frame


def test_batched_sdxl_jobs_match_the_same_jobs_alone(sdxl_engine):
    jobs = [
        EditParams(prompt="make it red", seed=1, num_inference_steps=5, num_outputs=2),
        EditParams(
            prompt="print a logo on it",
            negative_prompt="blurry",
            seed=2,
            num_inference_steps=5,
            guidance_scale=9.0,
            image_guidance_scale=1.2,
        ),
        EditParams(prompt="put it on a beach", seed=3, num_inference_steps=5, guidance_scale=3.0),
    ]
    images = [photo((64, 48), i) for i in range(len(jobs))]
    alone = [sdxl_engine.predict(im, p) for im, p in zip(images, jobs, strict=True)]
    calls = []
    hook = sdxl_engine.pipe.unet.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0])
    )
    try:
        batched = sdxl_engine.predict_batch(
            [EditRequest(im, p) for im, p in zip(images, jobs, strict=True)]
        )
    finally:
        hook.remove()
    assert calls == [3 * 4] * 5  # one UNet call per step for all 4 outputs' 3 branches
    for got, expected in zip(batched, alone, strict=True):
        assert_close(got, expected)


def test_an_sdxl_checkpoint_that_does_not_load_says_what_to_do(tiny_sdxl_dir, tmp_path):
    import shutil

    broken = Path(shutil.copytree(tiny_sdxl_dir, tmp_path / "broken"))
    config_path = broken / "text_encoder_2" / "config.json"
    config = json.loads(config_path.read_text())
    config["projection_dim"] = 16  # its weights are 32 wide
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelUnavailable) as info:
        EditEngine(str(broken), EngineOptions(device="cpu")).setup()
    assert "StableDiffusionXLInstructPix2PixPipeline" in str(info.value)
    assert "INSTRUCTEDIT_MODEL" in str(info.value)


def test_an_sdxl_pipeline_whose_configs_do_not_fit_is_refused(tiny_sdxl_dir):
    pipe = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(tiny_sdxl_dir)
    # Time ids of 4 values each: the UNet's added embedding expects 8.
    pipe.unet.register_to_config(addition_time_embed_dim=4)
    with pytest.raises(ModelUnavailable, match="do not fit together"):
        EditEngine("in-memory", EngineOptions(device="cpu")).use_pipeline(pipe)


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m_karras", "ddim"])
def test_samplers_on_sdxl_match_the_stock_pipeline_with_them(sdxl_engine, tiny_sdxl_dir, scheduler):
    params = EditParams(prompt="make it blue", num_inference_steps=4, seed=8, scheduler=scheduler)
    image = product_photo()
    (ours,) = sdxl_engine.predict(image, params)
    (theirs,) = stock_edit(tiny_sdxl_dir, image, params)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
