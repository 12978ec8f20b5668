"""Write a tiny random InstructPix2Pix pipeline to a directory.

    python -m services.gpu_worker.tiny_model DIR [--seed 0]

The result loads with `StableDiffusionInstructPix2PixPipeline.from_pretrained(DIR)`,
exactly like `timbrooks/instruct-pix2pix`, and runs on a CPU in well under a second.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from services.common.tiny_components import (
    build_euler_ancestral_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
    write_tokenizer,
)

TINY_MODEL_NAME = "tiny"


def write_tiny_instruct_pix2pix(directory: str | Path, seed: int = 0) -> Path:
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPTokenizer

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=build_vae(seed),
        text_encoder=build_text_encoder(vocab_size, seed + 1),
        tokenizer=tokenizer,
        # 4 noisy latent channels + 4 channels of the encoded input image.
        unet=build_unet(in_channels=8, seed=seed + 2),
        scheduler=build_euler_ancestral_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_tiny_instruct_pix2pix(args.directory, args.seed)
    print(f"tiny InstructPix2Pix pipeline written to {path}")


if __name__ == "__main__":
    main()
