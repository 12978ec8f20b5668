"""The edit engine: load an InstructPix2Pix model once (`setup`), edit images
(`predict_batch`).

Celery, Redis and storage stay outside this file: it takes PIL images and parameters and
returns PIL images, so it is benchmarked and tested on its own.

The denoising loop is our own rather than the pipeline's `__call__`, for one reason:
dynamic batching. Several jobs (different images, prompts, seeds, guidance scales, numbers
of outputs) share one UNet call per step, while each keeps its own random generator and
scheduler state, so every job gets exactly the noise it would get alone.

This file is the batcher and knows no model: encoding prompts and images, the UNet call
and decoding belong to the model family (services/gpu_worker/families/), picked from the
model's model_index.json, so SD 1.5 and SDXL InstructPix2Pix run through the same loop.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from pydantic import BaseModel, ConfigDict

from services.common.buckets import bucket_for
from services.common.diffusion import (
    is_out_of_memory,
    resolve_device,
    resolve_pipeline_dir,
    serving_dtype,
    step_kwargs,
)
from services.common.edit_params import EditParams, batch_key, uses_guidance
from services.common.schedulers import Scheduler, build_scheduler
from services.common.settings import Settings
from services.common.workers import EngineInfo
from services.gpu_worker.families import (
    NO_MODEL_HINT,
    ModelFamily,
    TextConditioning,
    family_for_model,
    family_for_pipeline,
)

__all__ = [
    "EditEngine",
    "EditRequest",
    "EngineOptions",
    "LeaveBatch",
    "StepCallback",
    "is_out_of_memory",
]

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]


class LeaveBatch(Exception):
    """Raised by a job's `on_step` to take that job out of the batch (a cancellation);
    any other exception from `on_step` ends the whole batch."""


class EngineOptions(BaseModel):
    """How the engine serves; each option is the setting of the same name (settings.py
    documents them), so `from_settings` is the only place options and settings meet."""

    model_config = ConfigDict(frozen=True)

    device: str = "auto"
    max_batch: int = 8
    compile_unet: bool = False
    compile_mode: str = "reduce-overhead"
    attention_slicing: bool = False
    vae_tiling: bool = False
    text_embedding_cache_size: int = 512
    resolution: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides) -> EngineOptions:
        values = {name: getattr(settings, name) for name in cls.model_fields}
        return cls(**{**values, **overrides})


@dataclass
class EditRequest:
    """One job's share of a batch. `on_step(step, total)` runs after each denoising step;
    LeaveBatch raised there takes this job out of the batch. `mask` (mode "L", the image's
    size, 0/255) marks in white where the edit may change the image."""

    image: Image.Image
    params: EditParams
    on_step: StepCallback | None = None
    mask: Image.Image | None = None


@dataclass
class _KeptLatents:
    """A masked job's blended latent diffusion: after every step, latents outside the mask
    are replaced by the input image's own latents noised to the next step (Avrahami et
    al., "Blended Latent Diffusion"; diffusers' inpainting pipeline does the same for
    4-channel UNets), so the edit grows only inside the mask and meets the kept area
    along its boundary."""

    editable: torch.Tensor  # 1 where the edit may change the latents, 0 where kept
    image: torch.Tensor  # the input image's denoised-space latents
    noise: torch.Tensor  # fixed for the whole run, drawn from the job's generator

    def blend(self, latents: torch.Tensor, scheduler, next_t: torch.Tensor | None):
        kept = self.image
        if next_t is not None:
            kept = scheduler.add_noise(self.image, self.noise, next_t.reshape(1))
        return self.editable * latents + (1 - self.editable) * kept


@dataclass
class _Job:
    request: EditRequest
    scheduler: object
    generator: torch.Generator
    latents: torch.Tensor
    image_latents: torch.Tensor
    text: TextConditioning
    negative: TextConditioning | None
    extra_step_kwargs: dict = field(default_factory=dict)
    keep: _KeptLatents | None = None
    outcome: list[Image.Image] | BaseException | None = None

    @property
    def n(self) -> int:
        return self.latents.shape[0]


def _mask_generator(seed: int) -> torch.Generator:
    # Seeds are below 2^32, so seed + 2^32 is no job's own seed.
    return torch.Generator(device="cpu").manual_seed(seed + 2**32)


class EditEngine:
    def __init__(self, model_path: str, options: EngineOptions | None = None) -> None:
        self.model_path = model_path
        self.options = options or EngineOptions()
        self.pipe = None
        self.family: ModelFamily | None = None
        self.info: EngineInfo | None = None
        self._embeds: OrderedDict[tuple, tuple] = OrderedDict()
        # One scheduler per sampler, built from the model's config once; jobs get copies.
        self._schedulers: dict[Scheduler, object] = {}

    # -- setup -------------------------------------------------------------------------

    def setup(self) -> EngineInfo:
        """Load the model (a local directory or a Hub id) with the family its
        model_index.json names, and configure it for serving."""
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # loading bars are noise in worker logs
        device = resolve_device(self.options.device)
        directory = resolve_pipeline_dir(self.model_path, NO_MODEL_HINT)
        family = family_for_model(directory)
        return self.use_pipeline(family.load(str(directory), serving_dtype(device)))

    def use_pipeline(self, pipe) -> EngineInfo:
        """Configure an already built pipeline for serving (setup() after loading; the
        benchmark hands in full-size pipelines built from configs)."""
        family = family_for_pipeline(pipe)(pipe)
        device = resolve_device(self.options.device)
        dtype = serving_dtype(device)
        if pipe.unet.dtype != dtype:
            pipe.to(dtype=dtype)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        family.check()
        attention = self._select_attention(pipe, device)
        if device.type == "cuda":
            # NHWC convolutions are the fast path for tensor cores.
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if self.options.attention_slicing:
            pipe.enable_attention_slicing()
        if self.options.vae_tiling:
            pipe.vae.enable_tiling()
        if self.options.compile_unet:
            # Pays off on CUDA (fused kernels, CUDA graphs with "reduce-overhead"); it also
            # works on CPU, which is how the tests check that it changes no output.
            pipe.unet = torch.compile(pipe.unet, mode=self.options.compile_mode)
            family.dynamic_batch = True
        self.pipe = pipe
        self.family = family
        self.resolution = self.options.resolution or family.resolution()
        self.info = EngineInfo(
            model=self.model_path,
            family=family.name,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            attention=attention,
            compiled=self.options.compile_unet,
            max_batch=self.options.max_batch,
            resolution=self.resolution,
        )
        log.info("edit engine loaded: %s", self.info)
        return self.info

    def _select_attention(self, pipe, device: torch.device) -> str:
        if device.type == "cuda" and not self.options.attention_slicing:
            try:
                import xformers  # noqa: F401

                pipe.enable_xformers_memory_efficient_attention()
                return "xformers"
            except Exception as exc:  # not installed, or no kernel for this GPU
                log.info("xformers unavailable (%s); using PyTorch SDPA", exc)
        if self.options.attention_slicing:
            return "sliced"
        # diffusers' default processors call torch's scaled_dot_product_attention, which
        # picks the flash or memory-efficient kernel on CUDA.
        return "sdpa"

    def bucket_for(self, width: int, height: int) -> tuple[int, int]:
        """The resolution bucket an image of this size runs at on this engine."""
        return bucket_for(width, height, self.resolution)

    def warmup(
        self, size: tuple[int, int] | None = None, batch_sizes: list[int] | None = None
    ) -> None:
        """Run every batch size in use once, so compilation, cuDNN autotuning and
        allocator growth happen before the first user request, not during it. `size`
        defaults to the square bucket."""
        size = size or self.bucket_for(1, 1)
        image = Image.new("RGB", size, (128, 128, 128))
        for batch in batch_sizes or [1]:
            requests = [
                EditRequest(image, EditParams(prompt="warm up", num_inference_steps=2, seed=i))
                for i in range(batch)
            ]
            self.predict_batch(requests)
        if torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.synchronize()

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    # -- inference ---------------------------------------------------------------------

    def predict(
        self,
        image: Image.Image,
        params: EditParams,
        on_step: StepCallback | None = None,
        mask: Image.Image | None = None,
    ) -> list[Image.Image]:
        """Edit one image (RGB, sides multiples of 8); exceptions from `on_step` propagate."""
        (outcome,) = self.predict_batch([EditRequest(image, params, on_step, mask)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    @torch.inference_mode()
    def predict_batch(self, requests: list[EditRequest]) -> list[list[Image.Image] | BaseException]:
        """Edit several compatible jobs together. Returns, per request, its images or the
        exception that ended it alone: LeaveBatch from its `on_step`, or an error while
        preparing or decoding it (e.g. its image ran out of memory). Errors in the shared
        UNet steps end the whole batch and propagate."""
        if self.pipe is None:
            raise RuntimeError("EditEngine.setup() was not called")
        keys = {batch_key(r.image.size, r.params) for r in requests}
        if len(keys) != 1:
            raise ValueError(f"requests do not share one batch key: {sorted(keys)}")
        cfg = uses_guidance(requests[0].params)
        steps = requests[0].params.num_inference_steps
        jobs: list[_Job | BaseException] = []
        for request in requests:
            try:
                jobs.append(self._prepare(request, cfg))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise  # a bug, not this job's problem: fail loudly
                jobs.append(exc)
        active = [job for job in jobs if isinstance(job, _Job)]
        timesteps = active[0].scheduler.timesteps if active else []
        for i, t in enumerate(timesteps):
            noise = self._unet_step(active, t, cfg)
            next_t = timesteps[i + 1] if i + 1 < len(timesteps) else None
            offset = 0
            for job in active:
                job_noise = noise[offset : offset + job.n]
                offset += job.n
                job.latents = job.scheduler.step(
                    job_noise, t, job.latents, **job.extra_step_kwargs, return_dict=False
                )[0]
                if job.keep is not None:
                    job.latents = job.keep.blend(job.latents, job.scheduler, next_t)
            still_active = []
            for job in active:
                try:
                    if job.request.on_step is not None:
                        job.request.on_step(i + 1, steps)
                    still_active.append(job)
                except LeaveBatch as exc:
                    job.outcome = exc
            active = still_active
            if not active:
                break
        for job in active:
            try:
                job.outcome = self.decode(job.latents)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                job.outcome = exc
        return [job if isinstance(job, BaseException) else job.outcome for job in jobs]

    def _prepare(self, request: EditRequest, cfg: bool) -> _Job:
        pipe, params = self.pipe, request.params
        device, dtype = self.device, pipe.unet.dtype
        n = params.num_outputs
        text, negative = self._encode_prompt(params.prompt, params.negative_prompt, cfg)
        image_latents = self.family.encode_image(request.image)
        scheduler = self._new_scheduler(params.scheduler)
        scheduler.set_timesteps(params.num_inference_steps, device=device)
        # A CPU generator gives the same noise for a seed on any device.
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        shape = (n, pipe.vae.config.latent_channels, *image_latents.shape[-2:])
        # Scaled by this job's scheduler: init_noise_sigma depends on its timesteps.
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents * scheduler.init_noise_sigma
        keep = None
        if request.mask is not None:
            keep = _KeptLatents(
                editable=self._latent_mask(request.mask, image_latents).to(dtype),
                image=self.family.denoised_latents(image_latents).repeat(n, 1, 1, 1),
                # From a generator of its own: the job's stream, which the sampler draws
                # from too, stays the one it has without a mask.
                noise=randn_tensor(
                    shape, generator=_mask_generator(params.seed), device=device, dtype=dtype
                ),
            )
        return _Job(
            request=request,
            scheduler=scheduler,
            generator=generator,
            latents=latents,
            image_latents=image_latents.repeat(n, 1, 1, 1),
            text=text.repeat(n),
            negative=negative.repeat(n) if negative is not None else None,
            extra_step_kwargs=step_kwargs(scheduler, generator),
            keep=keep,
        )

    def _latent_mask(self, mask: Image.Image, like: torch.Tensor) -> torch.Tensor:
        """The mask at the latents' size, (1, 1, h, w): a latent may change when any pixel
        it covers may. Editable latents a little past the mask's edge let the edit reach
        it; the pixel composite afterwards keeps every pixel outside exactly."""
        pixels = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
        pixels = pixels.to(like.device)[None, None]
        return (torch.nn.functional.adaptive_max_pool2d(pixels, like.shape[-2:]) > 0).float()

    def _new_scheduler(self, name: Scheduler):
        """A fresh scheduler of the job's sampler: each job steps its own state."""
        template = self._schedulers.get(name)
        if template is None:
            template = self._schedulers[name] = build_scheduler(name, self.pipe.scheduler.config)
        return copy.deepcopy(template)

    def _unet_step(self, jobs: list[_Job], t: torch.Tensor, cfg: bool) -> torch.Tensor:
        """One UNet call for every job; returns the guided noise, jobs in order."""
        scaled = torch.cat([j.scheduler.scale_model_input(j.latents, t) for j in jobs])
        image_latents = torch.cat([j.image_latents for j in jobs])
        text = TextConditioning.cat([j.text for j in jobs])
        size = jobs[0].request.image.size
        if not cfg:
            model_input = torch.cat([scaled, image_latents], dim=1)
            return self.family.predict_noise(model_input, t, text, size)
        negative = TextConditioning.cat([j.negative for j in jobs])
        # Branches [text, image, uncond]: the text branch sees prompt and image, the image
        # branch the image alone, the unconditional branch neither.
        model_input = torch.cat(
            [
                torch.cat([scaled, image_latents], dim=1),
                torch.cat([scaled, image_latents], dim=1),
                torch.cat([scaled, torch.zeros_like(image_latents)], dim=1),
            ]
        )
        branches = TextConditioning.cat([text, negative, negative])
        noise = self.family.predict_noise(model_input, t, branches, size)
        noise_text, noise_image, noise_uncond = noise.chunk(3)
        # Per-sample scales: each job keeps its own S_T and S_I inside the shared batch.
        s_t = self._per_sample([j.request.params.guidance_scale for j in jobs], jobs, noise)
        s_i = self._per_sample([j.request.params.image_guidance_scale for j in jobs], jobs, noise)
        return noise_uncond + s_t * (noise_text - noise_image) + s_i * (noise_image - noise_uncond)

    @staticmethod
    def _per_sample(values: list[float], jobs: list[_Job], like: torch.Tensor) -> torch.Tensor:
        repeated = [v for v, j in zip(values, jobs, strict=True) for _ in range(j.n)]
        return torch.tensor(repeated, dtype=like.dtype, device=like.device).view(-1, 1, 1, 1)

    def _encode_prompt(
        self, prompt: str, negative_prompt: str | None, cfg: bool
    ) -> tuple[TextConditioning, TextConditioning | None]:
        """The family's conditioning for (prompt, negative), cached: catalog edits repeat
        the same instructions, and the empty negative prompt is in nearly every job."""
        key = (prompt, negative_prompt, cfg)
        cached = self._embeds.get(key)
        if cached is not None:
            self._embeds.move_to_end(key)
            return cached
        result = self.family.encode_prompt(prompt, negative_prompt, cfg)
        if self.options.text_embedding_cache_size:
            self._embeds[key] = result
            while len(self._embeds) > self.options.text_embedding_cache_size:
                self._embeds.popitem(last=False)
        return result

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return self.family.decode(latents)
