"""Write a tiny random Stable Diffusion 1.x text-to-image pipeline to a directory.

    python -m services.datagen.tiny_sd DIR [--seed 0] [--scheduler pndm|ddim|euler]

The result loads with `StableDiffusionPipeline.from_pretrained(DIR)`, exactly like
`stable-diffusion-v1-5/stable-diffusion-v1-5` (same classes, same file layout, a PNDM
scheduler with SD 1.x's settings by default), makes 64x64 pictures of noise and runs a
denoising step on a CPU in milliseconds. The image-pair stage's tests and benchmark use it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from services.common.tiny_components import (
    build_text_encoder,
    build_unet,
    build_vae,
    write_tokenizer,
)

# Stable Diffusion 1.x's noise schedule, shared by every scheduler below.
SD1_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
SCHEDULERS = ("pndm", "ddim", "euler")


def build_scheduler(name: str = "pndm"):
    """A scheduler configured like the one SD 1.5 ships (PNDM) or a common alternative."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    if name == "pndm":
        return PNDMScheduler(
            **SD1_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1
        )
    if name == "ddim":
        return DDIMScheduler(
            **SD1_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1
        )
    if name == "euler":
        return EulerDiscreteScheduler(**SD1_SCHEDULE, steps_offset=1)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def build_tiny_stable_diffusion(seed: int = 0, scheduler: str = "pndm"):
    """The tiny pipeline in memory (what `write_tiny_stable_diffusion` saves)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    return StableDiffusionPipeline(
        vae=build_vae(seed),
        text_encoder=build_text_encoder(vocab_size, seed + 1),
        tokenizer=tokenizer,
        # Text-to-image: only the 4 noisy latent channels go in. A 64 px native size keeps
        # the datagen tests' images small.
        unet=build_unet(in_channels=4, seed=seed + 2, sample_size=8),
        scheduler=build_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_tiny_stable_diffusion(
    directory: str | Path, seed: int = 0, scheduler: str = "pndm"
) -> Path:
    directory = Path(directory)
    build_tiny_stable_diffusion(seed, scheduler).save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="pndm")
    args = parser.parse_args(argv)
    path = write_tiny_stable_diffusion(args.directory, args.seed, args.scheduler)
    print(f"tiny Stable Diffusion pipeline written to {path}")


if __name__ == "__main__":
    main()
