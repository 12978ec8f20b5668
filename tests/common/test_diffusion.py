"""Where pipelines come from, the engine's model family choice, and the fp16-safe decode."""

import json

import pytest
import torch

from services.common.diffusion import (
    ModelUnavailable,
    decode_latents,
    pipeline_class_name,
    resolve_pipeline_dir,
)
from services.gpu_worker.families import NO_MODEL_HINT, family_for_model


def resolve_model(model: str):
    return resolve_pipeline_dir(model, NO_MODEL_HINT)


def test_local_directory_resolves(tiny_model_dir):
    assert str(resolve_model(tiny_model_dir)) == tiny_model_dir


def test_directory_without_pipeline(tmp_path):
    with pytest.raises(ModelUnavailable, match=r"no model_index\.json"):
        resolve_model(str(tmp_path))


def test_missing_local_directory(tmp_path):
    with pytest.raises(ModelUnavailable, match="does not exist"):
        resolve_model(str(tmp_path / "absent"))


def test_hub_id_without_network_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailable) as info:
        resolve_model("timbrooks/instruct-pix2pix")
    message = str(info.value)
    assert "could not be downloaded" in message
    assert "INSTRUCTEDIT_MODEL" in message
    assert "MODEL=tiny" in message


def test_family_comes_from_model_index(tiny_model_dir, tmp_path):
    assert pipeline_class_name(tiny_model_dir) == "StableDiffusionInstructPix2PixPipeline"
    assert family_for_model(tiny_model_dir).name == "sd15"
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLInstructPix2PixPipeline"})
    )
    assert family_for_model(tmp_path).name == "sdxl"


def test_a_pipeline_no_family_serves_is_refused_by_name(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelUnavailable) as info:
        family_for_model(tmp_path)
    assert "FluxPipeline" in str(info.value)
    assert "StableDiffusionXLInstructPix2PixPipeline" in str(info.value)


def test_model_index_without_class_name(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelUnavailable, match="does not name a pipeline class"):
        family_for_model(tmp_path)


class _RecordingVAE(torch.nn.Module):
    """Stands in for AutoencoderKL.decode: records the dtype it decodes in, overflows to
    NaN in half precision."""

    def __init__(self, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1, dtype=dtype))
        self.calls = []

    @property
    def dtype(self):
        return self.weight.dtype

    def decode(self, latents, return_dict=False):
        self.calls.append((latents.dtype, self.dtype))
        out = latents[:, :3] * self.weight
        if self.dtype != torch.float32:
            out = torch.full_like(out, float("nan"))
        return (out,)


def test_decode_redoes_an_overflowing_half_precision_decode_in_float32():
    vae = _RecordingVAE(torch.bfloat16)
    pixels = decode_latents(vae, torch.ones(1, 4, 2, 2, dtype=torch.bfloat16))
    assert torch.isfinite(pixels).all()
    assert vae.calls == [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]
    assert vae.dtype == torch.bfloat16  # back in its serving dtype


def test_decode_upcasts_first_when_asked_and_restores_after_a_failure():
    vae = _RecordingVAE(torch.float16)
    pixels = decode_latents(vae, torch.ones(1, 4, 2, 2, dtype=torch.float16), upcast=True)
    assert vae.calls == [(torch.float32, torch.float32)]  # no wasted fp16 decode
    assert pixels.dtype == torch.float32
    assert vae.dtype == torch.float16

    def no_memory(*_, **__):
        raise RuntimeError("CUDA out of memory")

    vae.decode = no_memory
    with pytest.raises(RuntimeError, match="out of memory"):
        decode_latents(vae, torch.ones(1, 4, 2, 2, dtype=torch.float16), upcast=True)
    assert vae.dtype == torch.float16


# -- stepping a batch with noise drawn up front ----------------------------------------------


def _stepped(scheduler, generator, steps=3):
    from services.common.diffusion import noise_injecting_step, start_at_first_step, step_kwargs

    scheduler.set_timesteps(steps, device="cpu")
    start_at_first_step(scheduler)
    step = noise_injecting_step(type(scheduler))
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for t in scheduler.timesteps:
        scaled = scheduler.scale_model_input(sample, t)
        output = scaled * 0.3 - 0.1
        kwargs = step_kwargs(scheduler, generator)
        sample = step(scheduler, output, t, sample, **kwargs, return_dict=False)[0]
    return sample


@pytest.mark.parametrize("name", ["euler_ancestral", "lcm"])
def test_noise_drawn_up_front_is_the_noise_the_step_would_draw(name):
    """A NoiseSource of the generator's draws, made before the first step, gives the
    stock step's result to the bit; a real generator still works as before."""
    from diffusers import EulerAncestralDiscreteScheduler
    from diffusers.utils.torch_utils import randn_tensor

    from services.common.diffusion import NoiseSource, noise_draws
    from services.common.schedulers import build_scheduler

    config = EulerAncestralDiscreteScheduler().config
    stock = _stepped(build_scheduler(name, config), torch.Generator().manual_seed(7))
    plan = noise_draws(build_scheduler(name, config), 3, torch.float32)
    generator = torch.Generator().manual_seed(7)
    draws = [randn_tensor((2, 4, 8, 8), generator=generator, dtype=dtype) for _, dtype in plan]
    source = NoiseSource(draws)
    ours = _stepped(build_scheduler(name, config), source)
    assert torch.equal(ours, stock)
    assert source.taken == len(draws) > 0


def test_a_draw_of_another_shape_than_planned_is_refused():
    from services.common.diffusion import NoiseSource

    source = NoiseSource([torch.zeros(2, 4, 8, 8)])
    with pytest.raises(RuntimeError, match="planned"):
        source.next((3, 4, 8, 8), torch.float32)
    source.next((2, 4, 8, 8), torch.float32)
    with pytest.raises(RuntimeError, match="planned for fewer"):
        source.next((2, 4, 8, 8), torch.float32)


def test_a_step_that_draws_no_noise_is_the_schedulers_own():
    from diffusers import UniPCMultistepScheduler

    from services.common.diffusion import noise_injecting_step

    assert noise_injecting_step(UniPCMultistepScheduler) is UniPCMultistepScheduler.step


# -- 8-bit pictures on the device ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_uint8_pictures_on_the_device_are_the_stock_postprocessing(dtype):
    import numpy as np
    from diffusers.image_processor import VaeImageProcessor

    from services.common.diffusion import pil_images, to_uint8

    processor = VaeImageProcessor()
    pixels = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    # Values whose 8-bit level is a tie (k + 0.5) / 255, which rounding must break alike.
    ties = (torch.arange(16 * 24).reshape(16, 24) % 255 + 0.5) / 255 * 2 - 1
    pixels[0, 0] = ties
    pixels = pixels.to(dtype)
    stock = [np.asarray(image) for image in processor.postprocess(pixels, output_type="pil")]
    ours = to_uint8(pixels, processor)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 16, 24, 3)
    for a, b in zip(pil_images(ours), stock, strict=True):
        assert np.array_equal(np.asarray(a), b)
