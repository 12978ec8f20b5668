"""Fine-tuning on the tiny model and a tiny export: the objective learns, the results load
in the stock pipeline, the conditioning dropout follows diffusers' script."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from services.gpu_worker.finetune.config import FinetuneConfig
from services.gpu_worker.finetune.train import (
    FinetuneError,
    conditioning_dropout_masks,
    run_finetune,
)
from tests.gpu_worker.finetune.make_dataset import write_tiny_export

# 64 px: the tiny model's smallest bucket (8x8 latents), so a step takes tens of ms.
FAST = {
    "resolution": 64,
    "holdout_rows": 0,
    "validation_every": 0,
    "checkpoint_every": 1000,
    "log_every": 1,
}


def fast_config(**overrides) -> FinetuneConfig:
    return FinetuneConfig(**{**FAST, **overrides})


@pytest.fixture(scope="module")
def overfit(four_rows, tiny_model_dir, tmp_path_factory):
    """30 LoRA steps at a high learning rate on 4 rows (one batch), no dropout."""
    dest = tmp_path_factory.mktemp("overfit")
    losses = []
    config = fast_config(
        learning_rate=3e-2,
        rank=8,
        alpha=8,
        max_steps=30,
        batch_size=4,
        conditioning_dropout_prob=0.0,
        gradient_checkpointing=False,
    )
    result = run_finetune(
        config, four_rows, tiny_model_dir, dest, on_progress=lambda p: losses.append(p)
    )
    return result, losses


def test_training_lowers_the_loss(overfit):
    result, progress = overfit
    losses = [p.loss for p in progress]
    assert [p.step for p in progress] == list(range(1, 31))
    assert result.steps == 30 and not result.stopped and result.final_loss == losses[-1]
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    # Seeded and deterministic: observed 1.05 -> 0.88.
    assert last < first - 0.1, (first, last, losses)


def test_metrics_are_json_lines(overfit):
    result, progress = overfit
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert set(records[0]) == {
        "step",
        "loss",
        "lr",
        "images_per_s",
        "eta_s",
        "peak_memory_mb",
    }
    assert records[-1]["loss"] == pytest.approx(progress[-1].loss)
    assert records[0]["lr"] == pytest.approx(3e-2)
    assert records[-1]["peak_memory_mb"] > 0 and records[-1]["images_per_s"] > 0


def _edit(pipe) -> np.ndarray:
    image = Image.new("RGB", (64, 64), (30, 60, 220))
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "make the square red",
        image=image,
        num_inference_steps=3,
        generator=generator,
        output_type="np",
    ).images[0]


def test_lora_loads_in_the_stock_pipeline_and_changes_outputs(overfit, tiny_model_dir):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    result, _ = overfit
    assert result.adapter_dir == result.dest / "adapter"
    assert (result.adapter_dir / "pytorch_lora_weights.safetensors").is_file()
    assert result.pipeline_dir is None

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        tiny_model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    before = _edit(pipe)
    assert np.array_equal(before, _edit(pipe))  # the comparison is deterministic
    pipe.load_lora_weights(str(result.adapter_dir))
    assert pipe.unet.peft_config  # the adapter is in the UNet
    after = _edit(pipe)
    assert np.abs(after - before).max() > 1e-3


def test_full_finetune_saves_a_loadable_pipeline(four_rows, tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    config = fast_config(mode="full", learning_rate=1e-3, max_steps=2, batch_size=2, ema=True)
    result = run_finetune(config, four_rows, tiny_model_dir, tmp_path)
    assert result.adapter_dir is None and result.pipeline_dir == tmp_path / "pipeline"
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        result.pipeline_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    assert _edit(pipe).shape == (64, 64, 3)
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    changed = [
        name
        for (name, a), (_, b) in zip(
            base.state_dict().items(), pipe.unet.state_dict().items(), strict=True
        )
        if not torch.equal(a, b)
    ]
    assert changed  # the EMA weights moved off the base (decay warms up from 0)


def test_validation_renders_held_out_rows(tiny_model_dir, tmp_path, tmp_path_factory):
    export = str(write_tiny_export(tmp_path_factory.mktemp("export") / "six", rows=6, seed=1))
    config = fast_config(
        max_steps=2,
        batch_size=2,
        holdout_rows=2,
        validation_every=2,
        validation_rows=2,
        validation_inference_steps=2,
    )
    result = run_finetune(config, export, tiny_model_dir, tmp_path)
    renders = sorted((tmp_path / "validation" / "step-2").glob("*.png"))
    assert len(renders) == 2 and result.steps == 2
    assert Image.open(renders[0]).size == (64, 64)


def test_conditioning_dropout_follows_the_script():
    prob = 0.05
    generator = torch.Generator().manual_seed(0)
    random_p = torch.rand(200_000, generator=generator)
    prompt_mask, image_mask = conditioning_dropout_masks(random_p, prob)
    image_dropped = image_mask == 0
    assert image_mask.dtype.is_floating_point
    assert set(image_mask.unique().tolist()) == {0.0, 1.0}
    # Exactly the script's bands of p...
    assert torch.equal(prompt_mask, random_p < 2 * prob)
    assert torch.equal(image_dropped, (random_p >= prob) & (random_p < 3 * prob))
    # ...so: prompt only 5%, both 5%, image only 5%, neither 85%.
    shares = {
        "prompt only": (prompt_mask & ~image_dropped).float().mean().item(),
        "both": (prompt_mask & image_dropped).float().mean().item(),
        "image only": (~prompt_mask & image_dropped).float().mean().item(),
        "neither": (~prompt_mask & ~image_dropped).float().mean().item(),
    }
    expected = {"prompt only": 0.05, "both": 0.05, "image only": 0.05, "neither": 0.85}
    for key, share in shares.items():
        assert share == pytest.approx(expected[key], abs=0.003), key


def test_remote_outputs_are_refused_clearly(tiny_sdxl_dir, four_rows, tmp_path):
    # SDXL fine-tuning itself: test_train_sdxl.py.
    with pytest.raises(FinetuneError, match="local directory"):
        run_finetune(fast_config(max_steps=1), four_rows, tiny_sdxl_dir, "s3://bucket/run")


def test_config_bounds_and_defaults():
    config = FinetuneConfig()
    assert config.mode == "lora" and config.rank == 16 and config.alpha == 16
    assert config.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert config.effective_learning_rate == 1e-4
    assert FinetuneConfig(mode="full").effective_learning_rate == 5e-6
    assert FinetuneConfig(lora_conv=True).lora_target_modules[-3:] == [
        "conv1",
        "conv2",
        "conv_shortcut",
    ]
    for bad in ({"rank": 0}, {"ema": True}, {"conditioning_dropout_prob": 0.5}, {"x": 1}):
        with pytest.raises(ValueError):
            FinetuneConfig(**bad)
    for name, field in FinetuneConfig.model_fields.items():
        assert field.description, name


def test_config_imports_without_torch():
    code = (
        "import sys; from services.gpu_worker.finetune.config import FinetuneConfig; "
        "FinetuneConfig(); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_options_mirror_the_config():
    from services.gpu_worker.finetune.__main__ import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "--dataset",
            "d",
            "--base",
            "b",
            "--out",
            "o",
            "--mode",
            "full",
            "--learning-rate",
            "2e-6",
            "--no-gradient-checkpointing",
            "--target-modules",
            "to_q",
            "to_v",
            "--resolution",
            "none",
            "--max-steps",
            "7",
        ]
    )
    config = config_from_args(args)
    assert config.mode == "full" and config.learning_rate == 2e-6 and config.max_steps == 7
    assert config.gradient_checkpointing is False and config.target_modules == ["to_q", "to_v"]
    assert config.resolution is None and config.rank == 16


def test_prometheus_gauges_follow_the_run(four_rows, tiny_model_dir, tmp_path):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    losses = []
    run_finetune(
        fast_config(max_steps=2, batch_size=2),
        four_rows,
        tiny_model_dir,
        tmp_path,
        on_progress=lambda p: losses.append(p.loss),
        metrics=registry,
    )
    assert registry.get_sample_value("instructedit_finetune_step") == 2
    assert registry.get_sample_value("instructedit_finetune_loss") == pytest.approx(losses[-1])


def test_lora_on_convolutions_with_accumulation(four_rows, tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from safetensors.torch import load_file

    config = fast_config(
        max_steps=2, batch_size=2, gradient_accumulation=2, lora_conv=True, learning_rate=1e-2
    )
    result = run_finetune(config, four_rows, tiny_model_dir, tmp_path)
    weights = load_file(result.adapter_dir / "pytorch_lora_weights.safetensors")
    # diffusers' converter renames the attention layers' keys (to_q.lora.down), not the
    # convolutions' (conv1.lora_A); load_lora_weights reads both.
    assert any(".conv1.lora" in key for key in weights)
    assert any(".to_q.lora" in key for key in weights)
    record = json.loads(result.metrics_path.read_text().splitlines()[-1])
    assert record["step"] == 2 and record["images_per_s"] > 0
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        tiny_model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    before = _edit(pipe)
    pipe.load_lora_weights(str(result.adapter_dir))
    names = [name for name, _ in pipe.unet.named_parameters()]
    assert any(".conv1.lora_A." in name for name in names)
    after = _edit(pipe)
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-4


def test_bf16_lora_keeps_trained_weights_in_float32(four_rows, tiny_model_dir, tmp_path):
    """The GPU default (bf16 autocast, frozen weights in bf16, LoRA in float32), on the CPU:
    one image, one step (bf16 convolutions are slow on CPUs)."""
    from safetensors.torch import load_file

    config = fast_config(max_steps=1, batch_size=1, mixed_precision="bf16")
    result = run_finetune(config, four_rows, tiny_model_dir, tmp_path)
    assert math.isfinite(result.final_loss)
    weights = load_file(result.adapter_dir / "pytorch_lora_weights.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    saved = load_file(tmp_path / "checkpoints" / "step-1" / "weights.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_full_finetune_trains_the_text_encoder(four_rows, tiny_model_dir, tmp_path):
    from transformers import CLIPTextModel

    config = fast_config(
        mode="full", max_steps=2, batch_size=2, learning_rate=1e-3, train_text_encoder=True
    )
    result = run_finetune(config, four_rows, tiny_model_dir, tmp_path)
    base = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
    trained = CLIPTextModel.from_pretrained(result.pipeline_dir, subfolder="text_encoder")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(base.state_dict().values(), trained.state_dict().values(), strict=True)
    )


def test_text_encoder_lora_is_saved_and_loads_in_the_stock_pipeline(
    four_rows, tiny_model_dir, tmp_path
):
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from safetensors.torch import load_file

    config = fast_config(max_steps=1, batch_size=2, train_text_encoder=True)
    result = run_finetune(config, four_rows, tiny_model_dir, tmp_path)
    weights = load_file(result.adapter_dir / "pytorch_lora_weights.safetensors")
    assert any(key.startswith("text_encoder.") for key in weights)
    assert any(key.startswith("unet.") for key in weights)
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(result.adapter_dir)
    # The text encoder got its LoRA layers too (peft's, through transformers).
    assert any("lora" in name for name, _ in pipe.text_encoder.named_parameters())
