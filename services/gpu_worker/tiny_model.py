"""Write a tiny random InstructPix2Pix pipeline to a directory.

    python -m services.gpu_worker.tiny_model DIR [--family sd15|sdxl] [--seed 0]

The result loads with the family's diffusers pipeline class (`StableDiffusionInstruct
Pix2PixPipeline` like `timbrooks/instruct-pix2pix`, or `StableDiffusionXLInstructPix2Pix
Pipeline` like `diffusers/sdxl-instructpix2pix-768`), has the same file layout as those
checkpoints, and runs on a CPU in well under a second.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from services.common.tiny_components import (
    SDXL_UNET,
    SDXL_VAE_SCALING,
    build_euler_ancestral_scheduler,
    build_sdxl_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
    write_tokenizer,
)

# 4 noisy latent channels + 4 channels of the encoded input image.
IN_CHANNELS = 8


def _tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp), vocab_size


def write_tiny_instruct_pix2pix(directory: str | Path, seed: int = 0) -> Path:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    directory = Path(directory)
    tokenizer, vocab_size = _tokenizer()
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=build_vae(seed),
        text_encoder=build_text_encoder(vocab_size, seed + 1),
        tokenizer=tokenizer,
        unet=build_unet(in_channels=IN_CHANNELS, seed=seed + 2),
        scheduler=build_euler_ancestral_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    return directory


def write_tiny_sdxl_instruct_pix2pix(directory: str | Path, seed: int = 0) -> Path:
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    directory = Path(directory)
    tokenizer, vocab_size = _tokenizer()
    pipe = StableDiffusionXLInstructPix2PixPipeline(
        vae=build_vae(seed, scaling_factor=SDXL_VAE_SCALING),
        text_encoder=build_text_encoder(vocab_size, seed + 1),
        text_encoder_2=build_text_encoder(vocab_size, seed + 3, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=build_unet(in_channels=IN_CHANNELS, seed=seed + 2, **SDXL_UNET),
        scheduler=build_sdxl_scheduler(),
        add_watermarker=False,
    )
    pipe.save_pretrained(directory)
    return directory


WRITERS = {"sd15": write_tiny_instruct_pix2pix, "sdxl": write_tiny_sdxl_instruct_pix2pix}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--family", choices=sorted(WRITERS), default="sd15")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = WRITERS[args.family](args.directory, args.seed)
    print(f"tiny {args.family} InstructPix2Pix pipeline written to {path}")


if __name__ == "__main__":
    main()
