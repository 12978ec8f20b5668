"""Stable Diffusion 1.5 InstructPix2Pix (`timbrooks/instruct-pix2pix`): one CLIP text
encoder, a UNet with 8 input channels (4 noisy latent + 4 image latent), the SD VAE.

Every step mirrors diffusers' `StableDiffusionInstructPix2PixPipeline`, so a job alone is
pixel-identical to the stock pipeline (tests/gpu_worker/test_engine.py).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from PIL import Image

from services.common.diffusion import decode_latents
from services.gpu_worker.families.base import ModelFamily, TextConditioning


class StableDiffusionInstructPix2Pix(ModelFamily):
    name = "sd15"
    pipeline_class_name = "StableDiffusionInstructPix2PixPipeline"
    # Product photos, not open-ended generation: the safety checker would blank outputs.
    load_options: ClassVar[dict[str, object]] = {
        "safety_checker": None,
        "requires_safety_checker": False,
    }

    def __init__(self, pipe) -> None:
        super().__init__(pipe)
        from diffusers import StableDiffusionPipeline

        # The InstructPix2Pix pipeline's prompt encoding is private (`_encode_prompt`);
        # Stable Diffusion's text-to-image pipeline has the same one as its public
        # `encode_prompt`. This is a view on the same tokenizer and text encoder, nothing
        # is copied; it gets no scheduler, so its constructor's config fixes never touch
        # the one we serve with.
        self._text = StableDiffusionPipeline(
            vae=None,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            unet=None,
            scheduler=None,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def encode_prompt(
        self, prompt: str, negative_prompt: str | None, guided: bool
    ) -> tuple[TextConditioning, TextConditioning | None]:
        text, negative = self._text.encode_prompt(
            prompt, self.device, 1, guided, negative_prompt=negative_prompt
        )
        return TextConditioning(text), TextConditioning(negative) if guided else None

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.pipe.image_processor.preprocess(images)
        pixels = pixels.to(device=self.device, dtype=self.unet.dtype)
        # InstructPix2Pix conditions on the unscaled mode of the image's latent distribution.
        return self.vae.encode(pixels).latent_dist.mode()

    def unet_conditioning(self, text: TextConditioning, size: tuple[int, int]) -> dict:
        return {"encoder_hidden_states": text.hidden_states}

    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents / self.vae.config.scaling_factor)
