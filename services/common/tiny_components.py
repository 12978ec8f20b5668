"""Tiny, randomly initialised Stable Diffusion components for offline development and tests.

No model hub is reachable in CI, so the project generates its own miniature models: same
classes and file layout as the real checkpoints (loaded through the same `from_pretrained`
path), a few MB in size, deterministic for a seed. Their pictures are noise; their code
paths are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# A tokenizer-compatible vocab: every byte as a word piece and as a word end, no merges
# beyond what the format requires. Text tokenises to one token per character.
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
TEXT_HIDDEN = 32
# Width of CLIP's pooled text projection (SDXL conditions its UNet on it).
TEXT_PROJECTION = 32


def _bytes_to_unicode() -> list[str]:
    # CLIP's byte-level alphabet: printable bytes map to themselves, the rest above 255.
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(directory: Path) -> int:
    """Write a byte-level CLIP tokenizer (vocab.json, merges.txt); return its vocab size."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [START_TOKEN, END_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    # from_pretrained reads vocab.json + merges.txt in every transformers version; the
    # constructor's arguments changed between 4.x and 5.x.
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=77)
    tokenizer.save_pretrained(directory)
    return len(vocab)


def build_text_encoder(vocab_size: int, seed: int, with_projection: bool = False):
    """CLIP's text encoder; `with_projection` adds the pooled projection that SDXL's second
    text encoder has (CLIPTextModelWithProjection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=TEXT_PROJECTION,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


# The latent scaling of SD 1.x's VAE and of SDXL's.
SD_VAE_SCALING = 0.18215
SDXL_VAE_SCALING = 0.13025


def build_vae(seed: int, scaling_factor: float = SD_VAE_SCALING):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Four blocks give the real model's 8x latent downsampling, so image sizes behave alike.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    ).eval()


def build_unet(in_channels: int, seed: int, **architecture):
    """A tiny UNet2DConditionModel: SD 1.x's layout, or another given by `architecture`
    (SDXL_UNET)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = {
        # With the VAE's 8x downsampling: a 128 px default size, the tiny models' small
        # resolution budget (families/base.py), so tests at model size stay fast.
        "sample_size": 16,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": TEXT_HIDDEN,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }
    return UNet2DConditionModel(in_channels=in_channels, **{**config, **architecture}).eval()


# SDXL's UNet: attention in the lower block, both text encoders' hidden states side by side,
# and an "added" embedding of the pooled text and six time ids (SDXL_TIME_EMBED values each).
SDXL_TIME_EMBED = 8
SDXL_UNET = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 2 * TEXT_HIDDEN,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "transformer_layers_per_block": (1, 2),
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": SDXL_TIME_EMBED,
    "projection_class_embeddings_input_dim": 6 * SDXL_TIME_EMBED + TEXT_PROJECTION,
}


def build_euler_ancestral_scheduler():
    from diffusers import EulerAncestralDiscreteScheduler

    # Stable Diffusion 1.x's noise schedule.
    return EulerAncestralDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
    )


def build_sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    # The scheduler config SDXL checkpoints ship (sdxl-instructpix2pix-768 among them).
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
