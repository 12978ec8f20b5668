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
