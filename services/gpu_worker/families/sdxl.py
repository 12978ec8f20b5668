"""SDXL InstructPix2Pix (`diffusers/sdxl-instructpix2pix-768`): two CLIP text encoders
whose hidden states are concatenated, a pooled text embedding and "added time ids"
(original size, crop, target size) as extra UNet conditioning, the SDXL VAE.

Every step mirrors diffusers' `StableDiffusionXLInstructPix2PixPipeline`, so a job alone is
pixel-identical to the stock pipeline (tests/gpu_worker/test_sdxl_family.py), with one
deliberate difference: no invisible watermark (the stock pipeline adds one only when the
`invisible-watermark` package is installed; a product photo must come back unmarked).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from PIL import Image

from services.common.diffusion import (
    ModelUnavailable,
    decode_latents,
    vae_in_float32,
)
from services.gpu_worker.families.base import ModelFamily, TextConditioning

# SDXL's micro-conditioning: original size (h, w), crop top-left (y, x), target size (h, w).
TIME_ID_COUNT = 6


class StableDiffusionXLInstructPix2Pix(ModelFamily):
    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLInstructPix2PixPipeline"
    load_options: ClassVar[dict[str, object]] = {"add_watermarker": False}

    def __init__(self, pipe) -> None:
        super().__init__(pipe)
        # Per image size: built once on the device, not copied from the host every batch.
        self._time_ids: dict[tuple[int, int], torch.Tensor] = {}

    def check(self) -> None:
        pipe = self.pipe
        if pipe.text_encoder_2 is None:
            raise ModelUnavailable("this SDXL InstructPix2Pix model has no text_encoder_2")
        given = (
            TIME_ID_COUNT * pipe.unet.config.addition_time_embed_dim
            + pipe.text_encoder_2.config.projection_dim
        )
        expected = pipe.unet.add_embedding.linear_1.in_features
        if given != expected:
            raise ModelUnavailable(
                f"the UNet expects an added embedding of {expected} values, the text encoder "
                f"and time ids give {given}: the model's configs do not fit together"
            )

    def encode_prompt(
        self, prompt: str, negative_prompt: str | None, guided: bool
    ) -> tuple[TextConditioning, TextConditioning | None]:
        text, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompt,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt,
        )
        if not guided:
            return TextConditioning(text, pooled), None
        return TextConditioning(text, pooled), TextConditioning(negative, negative_pooled)

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        pipe, vae = self.pipe, self.vae
        width, height = images[0].size
        pixels = pipe.image_processor.preprocess(images, height=height, width=width)
        pixels = pixels.to(device=self.device, dtype=self.unet.dtype)
        if self._upcast_vae():
            with vae_in_float32(vae):
                latents = vae.encode(pixels.float()).latent_dist.mode()
        else:
            latents = vae.encode(pixels).latent_dist.mode()
        latents = latents.to(vae.dtype)
        if getattr(pipe, "is_cosxl_edit", False):
            # CosXL Edit checkpoints were trained on scaled image latents.
            latents = latents * vae.config.scaling_factor
        return latents

    def unet_conditioning(self, text: TextConditioning, size: tuple[int, int]) -> dict:
        time_ids = self._time_ids_for(size, text.hidden_states.dtype).repeat(text.batch_size, 1)
        return {
            "encoder_hidden_states": text.hidden_states,
            "added_cond_kwargs": {"text_embeds": text.pooled, "time_ids": time_ids},
        }

    def _time_ids_for(self, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        ids = self._time_ids.get(size)
        if ids is None or ids.dtype != dtype:
            width, height = size
            # Original size = target size = the image's, no crop: the stock pipeline's
            # defaults for an image given at the size it is generated at.
            ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype)
            ids = self._time_ids[size] = ids.to(self.device)
        return ids

    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        upcast = self._upcast_vae()
        if upcast:
            latents = latents.float()  # unscaled in float32, as the stock pipeline does
        mean = getattr(config, "latents_mean", None)
        std = getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, config.latent_channels, 1, 1)
            mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        return decode_latents(self.vae, latents, upcast=upcast)

    def denoised_latents(self, image_latents: torch.Tensor) -> torch.Tensor:
        if getattr(self.pipe, "is_cosxl_edit", False):
            return image_latents  # encode_image scaled them already
        config = self.vae.config
        mean = getattr(config, "latents_mean", None)
        std = getattr(config, "latents_std", None)
        if mean is not None and std is not None:  # the inverse of decode's unscaling
            shape = (1, config.latent_channels, 1, 1)
            mean = torch.tensor(mean).view(shape).to(image_latents.device, image_latents.dtype)
            std = torch.tensor(std).view(shape).to(image_latents.device, image_latents.dtype)
            return (image_latents - mean) * config.scaling_factor / std
        return image_latents * config.scaling_factor

    def _upcast_vae(self) -> bool:
        # The original SDXL VAE overflows in fp16 and says so (`force_upcast`); the
        # fp16-fix VAE that sdxl-instructpix2pix-768 ships does not.
        return self.vae.dtype == torch.float16 and bool(self.vae.config.force_upcast)
