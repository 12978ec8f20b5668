"""Stable Diffusion 1.5-sized components with random weights, built from their configs.

The real models' compute and memory without downloading them: what the benchmarks time.
The tokenizer is the tiny byte-level one (one token per character); prompts are padded to
77 tokens anyway, so the text encoder's cost is the real one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from services.common.tiny_components import write_tokenizer


def full_size_components(unet_in_channels: int, device: torch.device) -> dict:
    """UNet (4 input channels for text-to-image, 8 for InstructPix2Pix), SD VAE,
    CLIP ViT-L/14 text encoder and a tokenizer, initialised directly on `device`
    (random init of ~1B parameters on a CPU takes minutes)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(  # the defaults are SD 1.x's but for these
            sample_size=64,
            in_channels=unet_in_channels,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=768,
                bos_token_id=vocab - 2,
                eos_token_id=vocab - 1,
                pad_token_id=vocab - 1,
            )
        )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
    }
