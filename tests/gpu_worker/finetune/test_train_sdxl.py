"""Fine-tuning the tiny SDXL InstructPix2Pix: LoRA trains and loads in the stock SDXL
pipeline (load_lora_weights), full mode saves a loadable SDXL pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from services.gpu_worker.finetune.config import FinetuneConfig
from services.gpu_worker.finetune.train import FinetuneError, run_finetune
from tests.gpu_worker.finetune.make_dataset import write_tiny_export
from tests.gpu_worker.finetune.test_train import fast_config


def _stock(directory):
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    pipe = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _edit(pipe) -> np.ndarray:
    image = Image.new("RGB", (64, 64), (30, 60, 220))
    return pipe(
        "make the square red",
        image=image,
        height=64,
        width=64,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


def test_sdxl_lora_trains_and_loads_in_the_stock_pipeline(four_rows, tiny_sdxl_dir, tmp_path):
    from safetensors.torch import load_file

    progress = []
    # Dropout on: the SDXL null (empty-prompt) prompt and pooled embeddings are exercised.
    config = fast_config(
        max_steps=3,
        batch_size=2,
        learning_rate=3e-2,
        conditioning_dropout_prob=0.3,
    )
    result = run_finetune(config, four_rows, tiny_sdxl_dir, tmp_path, on_progress=progress.append)
    assert result.steps == 3 and not result.stopped and result.pipeline_dir is None
    assert [p.step for p in progress] == [1, 2, 3]
    assert all(math.isfinite(p.loss) for p in progress)
    weights = load_file(result.adapter_dir / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("unet.") for key in weights)

    pipe = _stock(tiny_sdxl_dir)
    before = _edit(pipe)
    assert np.array_equal(before, _edit(pipe))  # the comparison is deterministic
    pipe.load_lora_weights(str(result.adapter_dir))
    assert pipe.unet.peft_config  # the adapter is in the UNet
    after = _edit(pipe)
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-3


def test_sdxl_full_finetune_saves_a_loadable_pipeline(four_rows, tiny_sdxl_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    config = fast_config(mode="full", learning_rate=1e-3, max_steps=1, batch_size=2)
    result = run_finetune(config, four_rows, tiny_sdxl_dir, tmp_path)
    assert result.adapter_dir is None and result.pipeline_dir == tmp_path / "pipeline"
    pipe = _stock(result.pipeline_dir)
    assert pipe.text_encoder_2 is not None and pipe.tokenizer_2 is not None
    assert _edit(pipe).shape == (64, 64, 3)
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(base.state_dict().values(), pipe.unet.state_dict().values(), strict=True)
    )


def test_sdxl_text_encoder_training_is_refused(four_rows, tiny_sdxl_dir, tmp_path):
    config = fast_config(max_steps=1, train_text_encoder=True)
    with pytest.raises(FinetuneError, match="SDXL"):
        run_finetune(config, four_rows, tiny_sdxl_dir, tmp_path)


def test_sdxl_bf16_validation_keeps_the_vae_in_float32(tiny_sdxl_dir, tmp_path, tmp_path_factory):
    """bf16 autocast (the GPU default) on the CPU: frozen UNet and text encoders in bf16,
    SDXL's VAE in float32; validation renders at the bucket size."""
    export = str(write_tiny_export(tmp_path_factory.mktemp("export") / "six", rows=6, seed=1))
    config = fast_config(
        max_steps=1,
        batch_size=1,
        mixed_precision="bf16",
        holdout_rows=2,
        validation_every=1,
        validation_rows=1,
        validation_inference_steps=2,
    )
    result = run_finetune(config, export, tiny_sdxl_dir, tmp_path)
    assert math.isfinite(result.final_loss)
    renders = sorted((tmp_path / "validation" / "step-1").glob("*.png"))
    assert len(renders) == 1 and Image.open(renders[0]).size == (64, 64)


def test_sdxl_conditioning_matches_the_pipeline(four_rows, tiny_sdxl_dir, tmp_path):
    """The trainer's prompt and pooled embeddings are the stock pipeline's, the VAE stays
    float32 under bf16, and the default resolution is the family's."""
    from services.gpu_worker.finetune.train import _Trainer

    half = _Trainer(
        FinetuneConfig(mixed_precision="bf16", holdout_rows=0), four_rows, tiny_sdxl_dir, tmp_path
    )
    assert half.sdxl and half.vae.dtype == torch.float32
    assert half.text_encoder_2.dtype == torch.bfloat16 and half.unet.dtype == torch.bfloat16
    assert half.resolution == 128  # the tiny UNet's sample_size 16 x the VAE's 8
    trainer = _Trainer(
        FinetuneConfig(mixed_precision="no", holdout_rows=0), four_rows, tiny_sdxl_dir, tmp_path
    )
    embeds, pooled = trainer._encode_sdxl(["make the square red"])
    pipe = _stock(tiny_sdxl_dir)
    expected, _, expected_pooled, _ = pipe.encode_prompt(
        "make the square red", device="cpu", do_classifier_free_guidance=False
    )
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(pooled, expected_pooled)
    null, null_pooled = trainer.null_sdxl
    expected, _, expected_pooled, _ = pipe.encode_prompt(
        "", device="cpu", do_classifier_free_guidance=False
    )
    torch.testing.assert_close(null, expected)
    torch.testing.assert_close(null_pooled, expected_pooled)
