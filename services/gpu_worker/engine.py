"""The edit engine: load InstructPix2Pix once (`setup`), edit images (`predict`).

Celery, Redis and storage stay outside this file; it takes a PIL image and parameters and
returns PIL images, so it is benchmarked and tested on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from services.common.jobs import EditParams

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class EngineInfo:
    model: str
    device: str
    dtype: str
    attention: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("INSTRUCTEDIT_DEVICE=cuda but no CUDA device is available")
    return torch.device(device)


class EditEngine:
    def __init__(self, model_path: str, device: str = "auto") -> None:
        self.model_path = model_path
        self.requested_device = device
        self.pipe = None
        self.info: EngineInfo | None = None

    def setup(self) -> EngineInfo:
        from diffusers import StableDiffusionInstructPix2PixPipeline
        from diffusers.utils import logging as diffusers_logging

        # Loading bars are noise in a worker's JSON logs.
        diffusers_logging.disable_progress_bar()

        device = resolve_device(self.requested_device)
        # fp16 halves memory and doubles tensor-core throughput; CPUs have no fast fp16.
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            self.model_path,
            dtype=dtype,
            # Product photos, not open-ended generation: the checker would blank outputs.
            safety_checker=None,
            requires_safety_checker=False,
        )
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        attention = self._select_attention(pipe, device)
        self.pipe = pipe
        self.info = EngineInfo(
            model=self.model_path,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            attention=attention,
        )
        log.info("edit engine ready: %s", self.info)
        return self.info

    @staticmethod
    def _select_attention(pipe, device: torch.device) -> str:
        if device.type == "cuda":
            try:
                import xformers  # noqa: F401

                pipe.enable_xformers_memory_efficient_attention()
                return "xformers"
            except Exception as exc:  # not installed, or no kernel for this GPU
                log.info("xformers unavailable (%s); using PyTorch SDPA", exc)
        # diffusers' default processors call torch's scaled_dot_product_attention.
        return "sdpa"

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def predict(
        self, image: Image.Image, params: EditParams, on_step: StepCallback | None = None
    ) -> list[Image.Image]:
        """Edit `image` (already RGB, sides multiples of 8) by `params.prompt`.

        `on_step(step, total)` runs after every denoising step; an exception raised in it
        (a cancellation) stops the denoising at once and propagates.
        """
        if self.pipe is None:
            raise RuntimeError("EditEngine.setup() was not called")

        def step_end(pipe, i, t, tensors):
            if on_step is not None:
                on_step(i + 1, params.num_inference_steps)
            return tensors

        # A CPU generator gives the same noise for a seed on any device.
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        with torch.inference_mode():
            latents = self.pipe(
                prompt=params.prompt,
                image=image,
                negative_prompt=params.negative_prompt,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                image_guidance_scale=params.image_guidance_scale,
                num_images_per_prompt=params.num_outputs,
                generator=generator,
                output_type="latent",
                callback_on_step_end=step_end,
            ).images
            return self.decode(latents)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipe.vae
        scaled = latents / vae.config.scaling_factor
        pixels = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
        if not torch.isfinite(pixels).all():
            # The SD VAE decoder's activations can overflow fp16 into inf/NaN, which becomes
            # a black picture. Redo that decode in float32: slower, but always finite.
            log.warning("fp16 VAE decode overflowed; decoding again in float32")
            pixels = vae.to(torch.float32).decode(scaled.float(), return_dict=False)[0]
            vae.to(self.pipe.unet.dtype)
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")
