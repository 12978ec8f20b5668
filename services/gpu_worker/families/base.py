"""The seam between the batching engine and a model: what a model family must do.

The engine (services/gpu_worker/engine.py) owns everything that does not depend on the
model: gathering jobs into one UNet batch, each job's seed, noise and guidance scales,
the shared scheduler, the three-branch InstructPix2Pix guidance, progress, cancel and
out-of-memory handling. A family owns what does: encoding the prompt and a batch of
images, the conditioning its UNet takes for a batch (built once per batch, not per step),
one UNet call, and decoding a batch of latents to 8-bit pictures on the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from PIL import Image

from services.common.buckets import FAMILY_RESOLUTIONS
from services.common.diffusion import load_pipeline, pil_images, to_uint8
from services.gpu_worker.families.hints import NO_MODEL_HINT


@dataclass(frozen=True)
class TextConditioning:
    """One prompt's conditioning of the UNet, batch dimension first: the text encoder's
    hidden states and, for families that use one (SDXL), a pooled embedding."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None

    def repeat(self, n: int) -> TextConditioning:
        return TextConditioning(
            self.hidden_states.repeat(n, 1, 1),
            None if self.pooled is None else self.pooled.repeat(n, 1),
        )

    @staticmethod
    def cat(items: list[TextConditioning]) -> TextConditioning:
        pooled = [item.pooled for item in items]
        return TextConditioning(
            torch.cat([item.hidden_states for item in items]),
            None if pooled[0] is None else torch.cat(pooled),
        )

    @property
    def batch_size(self) -> int:
        return self.hidden_states.shape[0]


class ModelFamily(ABC):
    """One kind of InstructPix2Pix model, wrapping its loaded diffusers pipeline."""

    # Short name reported by /readyz ("sd15", "sdxl").
    name: ClassVar[str]
    # The diffusers pipeline class a model directory's model_index.json names.
    pipeline_class_name: ClassVar[str]
    # What the pipeline is loaded with (its from_pretrained keyword arguments).
    load_options: ClassVar[dict[str, object]] = {}

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    @classmethod
    def load(cls, model: str, dtype: torch.dtype):
        """The family's diffusers pipeline from a local directory or Hub id, for serving."""
        import diffusers

        pipeline_class = getattr(diffusers, cls.pipeline_class_name)
        return load_pipeline(pipeline_class, model, dtype, NO_MODEL_HINT, **cls.load_options)

    def check(self) -> None:  # noqa: B027 - optional hook
        """Raise ModelUnavailable if the loaded components cannot work together."""

    @abstractmethod
    def encode_prompt(
        self, prompt: str, negative_prompt: str | None, guided: bool
    ) -> tuple[TextConditioning, TextConditioning | None]:
        """(prompt, negative) conditioning with batch size 1; negative is None unguided."""

    @abstractmethod
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """The latents InstructPix2Pix conditions on, for RGB images of one size whose
        sides are multiples of 8, in one VAE call; batch size len(images)."""

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """`encode_images` of one image; batch size 1."""
        return self.encode_images([image])

    @abstractmethod
    def unet_conditioning(self, text: TextConditioning, size: tuple[int, int]) -> dict:
        """The UNet's keyword arguments besides the sample and the timestep, for a batch
        whose rows of conditioning are `text`, of images of `size` (w, h). Built once per
        batch: the same tensors serve every step."""

    def predict_noise(
        self, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict
    ) -> torch.Tensor:
        """One UNet call on `sample` (noisy latents and image latents, concatenated on the
        channels) with the batch's `unet_conditioning`; `timestep` is a tensor on the
        device, so that a compiled UNet neither specialises on its value nor copies it."""
        return self.unet(sample, timestep, **conditioning, return_dict=False)[0]

    @abstractmethod
    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (N, 3, H, W) of denoised latents, in one VAE call (or two,
        when an fp16 decode overflows: services/common/diffusion.py)."""

    def decode_uint8(self, latents: torch.Tensor) -> torch.Tensor:
        """8-bit pictures (N, H, W, 3) of denoised latents, still on the device: what the
        stock pipeline's postprocessing makes of them, to the bit."""
        return to_uint8(self.decode_pixels(latents), self.pipe.image_processor)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Pictures of denoised latents."""
        return pil_images(self.decode_uint8(latents))

    def denoised_latents(self, image_latents: torch.Tensor) -> torch.Tensor:
        """The image's conditioning latents (`encode_image`) as the latents the denoising
        loop ends at, the ones `decode` turns into this image: what a masked edit keeps
        outside its mask. SD's VAE latents are scaled by the VAE's scaling factor."""
        return image_latents * self.vae.config.scaling_factor

    def resolution(self) -> int:
        """The area budget (as a side length) the model runs at: its family's training
        resolution, or the model's own default size (UNet sample size times the VAE's
        downsampling, diffusers' default height and width) when that is smaller, as in
        the tiny test models."""
        sample = self.unet.config.sample_size
        sample = min(sample) if isinstance(sample, list | tuple) else sample
        native = int(sample) * self.pipe.vae_scale_factor
        return min(FAMILY_RESOLUTIONS[self.name], native)

    # -- shared by the families ---------------------------------------------------------

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.pipe.device
