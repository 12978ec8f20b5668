"""The edit engine: load an InstructPix2Pix model once (`setup`), edit images
(`predict_batch`).

Celery, Redis and storage stay outside this file: it takes PIL images and parameters and
returns PIL images, so it is benchmarked and tested on its own.

The denoising loop is our own rather than the pipeline's `__call__`, for dynamic batching:
several jobs (different images, prompts, seeds, guidance scales, numbers of outputs,
masks) share one UNet call and one scheduler step per step, while each job's noise still
comes from its own generator, drawn in the order and shapes the stock pipeline draws it,
so every job gets exactly the noise it would get alone, and a job alone is bit-identical
to the stock pipeline.

It is written for the GPU's terms:

- Everything per batch (the model input buffer with the image latents in place, the text
  conditioning of the three guidance branches, per-sample guidance scales, every step's
  noise, a masked edit's kept latents) is built once when the batch starts, and again
  only when a job leaves it; a step only runs the UNet, the guidance sum and one scheduler
  step, with no host-device synchronisation in between (see `_denoise`).
- VAE encode and decode run once for the whole batch, and the pictures become 8-bit on
  the device: one copy of bytes to the host per batch.
- A compiled UNet sees a few fixed shapes: batches are padded to batch buckets, inputs
  come at resolution buckets, and `warmup` compiles every (resolution bucket x batch
  bucket x guidance mode) at worker start; a compile after that is counted and logged.

This file is the batcher and knows no model: encoding prompts and images, the UNet's
conditioning and decoding belong to the model family (services/gpu_worker/families/),
picked from the model's model_index.json, so SD 1.5 and SDXL InstructPix2Pix run through
the same loop.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from pydantic import BaseModel, ConfigDict

from services.common.buckets import bucket_for, resolution_buckets
from services.common.diffusion import (
    NoiseSource,
    is_out_of_memory,
    noise_draws,
    noise_injecting_step,
    resolve_device,
    resolve_pipeline_dir,
    serving_dtype,
    start_at_first_step,
    step_kwargs,
)
from services.common.edit_params import EditParams, batch_key, uses_guidance
from services.common.schedulers import Scheduler, build_scheduler
from services.common.settings import (
    DEFAULT_BATCH_BUCKETS,
    BatchBuckets,
    Settings,
    WarmupBuckets,
)
from services.common.workers import EngineInfo
from services.gpu_worker.adapters import AdapterCache, AdapterUnavailable, Resolve
from services.gpu_worker.families import (
    NO_MODEL_HINT,
    ModelFamily,
    TextConditioning,
    family_for_model,
    family_for_pipeline,
)
from services.gpu_worker.metrics import observe_unet_recompiles

__all__ = [
    "AdapterUnavailable",
    "EditEngine",
    "EditRequest",
    "EngineOptions",
    "LeaveBatch",
    "StepCallback",
    "WarmupPair",
    "is_out_of_memory",
]

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]

# The most outputs one job may ask for (EditParams.num_outputs): a batch always has room
# for one job's.
MAX_OUTPUTS = next(
    bound.le for bound in EditParams.model_fields["num_outputs"].metadata if hasattr(bound, "le")
)
# torch.compile modes that capture CUDA graphs (whose outputs a later replay overwrites).
CUDA_GRAPH_MODES = {"reduce-overhead", "max-autotune"}
WARMUP_STEPS = 2  # a compiled shape's first call compiles, the second records CUDA graphs


class LeaveBatch(Exception):
    """Raised by a job's `on_step` to take that job out of the batch (a cancellation);
    any other exception from `on_step` ends the whole batch."""


class EngineOptions(BaseModel):
    """How the engine serves; each option but `sync_debug` is the setting of the same name
    (settings.py documents them), so `from_settings` is the only place options and
    settings meet."""

    model_config = ConfigDict(frozen=True)

    device: str = "auto"
    max_batch: int = 8
    batch_buckets: BatchBuckets = DEFAULT_BATCH_BUCKETS
    compile_unet: bool = False
    compile_mode: str = "reduce-overhead"
    warmup_buckets: WarmupBuckets = None
    attention: Literal["sdpa", "xformers", "sliced"] = "sdpa"
    attention_slicing: bool = False
    vae_tiling: bool = False
    text_embedding_cache_size: int = 512
    adapter_cache_size: int = 4
    resolution: int | None = None
    # Not a setting: on CUDA, run the denoising loop under
    # torch.cuda.set_sync_debug_mode("error"), so that any host-device synchronisation in
    # it raises (the GPU benchmark's proof that the loop never waits for the GPU).
    sync_debug: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, **overrides) -> EngineOptions:
        values = {
            name: getattr(settings, name)
            for name in cls.model_fields
            if name in type(settings).model_fields
        }
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


@dataclass(frozen=True)
class WarmupPair:
    """One shape `warmup` ran: a resolution bucket, a batch bucket (in outputs) and a
    guidance mode; the UNet's batch (3 branches per output when guided), the seconds its
    first batch took (compiling, on a compiled UNet) and the graphs it compiled."""

    size: tuple[int, int]
    samples: int
    guided: bool
    unet_batch: int
    seconds: float
    graphs: int


@dataclass
class _Job:
    request: EditRequest
    text: TextConditioning
    negative: TextConditioning | None
    image_latents: torch.Tensor | None = None  # (1, C, h, w), from the batch's VAE encode
    outcome: list[Image.Image] | BaseException | None = None

    @property
    def n(self) -> int:
        return self.request.params.num_outputs

    @property
    def params(self) -> EditParams:
        return self.request.params


def _mask_generator(seed: int) -> torch.Generator:
    # Seeds are below 2^32, so seed + 2^32 is no job's own seed.
    return torch.Generator(device="cpu").manual_seed(seed + 2**32)


def _padded(x: torch.Tensor, size: int, dim: int = 0) -> torch.Tensor:
    """`x` with zeros appended along `dim` up to `size` rows."""
    missing = size - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim)


def _take(x: torch.Tensor, spans: list[tuple[int, int]], size: int, dim: int = 0) -> torch.Tensor:
    """The rows `spans` of `x` along `dim`, in order, padded with zeros to `size` rows:
    slices and one concatenation, so no index tensor is copied to the device."""
    parts = [x.narrow(dim, start, stop - start) for start, stop in spans]
    return _padded(torch.cat(parts, dim), size, dim)


class _Batch:
    """One batch's denoising state: its jobs, their samples' rows and every per-batch
    tensor. Built when the batch starts (`__init__`) and again only when a job leaves it
    (`drop`), never per step."""

    def __init__(self, engine: EditEngine, jobs: list[_Job], guided: bool) -> None:
        self.engine = engine
        self.guided = guided
        self.branches = 3 if guided else 1
        params = jobs[0].params
        self.steps = params.num_inference_steps
        self.size = jobs[0].request.image.size
        device, dtype = engine.device, engine.pipe.unet.dtype
        self.dtype = dtype

        # One scheduler for the whole batch: its jobs share sampler and timesteps (the
        # batch key), and its per-sample state (multistep histories) works on the
        # concatenated samples as it would on one job's.
        scheduler = self.scheduler = engine._new_scheduler(params.scheduler)
        # Its timesteps on the host: the schedulers' own arithmetic on them (DDIM's and
        # LCM's alpha lookups, LCM's boundary scalings) then never reads the device.
        scheduler.set_timesteps(self.steps, device="cpu")
        start_at_first_step(scheduler)
        self.timesteps = list(scheduler.timesteps)
        # The UNet's timesteps, one tensor each on the device (so a compiled UNet neither
        # specialises on a value nor copies one from the host per step), in float32
        # whatever the sampler's dtype (int64 for DPM++, DDIM, UniPC, LCM): the UNet's
        # time embedding takes `.float()` of them first, so the values are the same and
        # every sampler shares the compiled graphs.
        on_device = scheduler.timesteps.to(device=device, dtype=torch.float32)
        self.unet_timesteps = [t.clone() for t in on_device]
        self.step = noise_injecting_step(type(scheduler))

        latent_channels = engine.pipe.vae.config.latent_channels
        latent_size = jobs[0].image_latents.shape[-2:]
        self.sample_shape = (latent_channels, *latent_size)
        self.jobs = jobs
        self.spans = self._spans(jobs)
        self.padded = engine.padded_size(sum(job.n for job in jobs))

        # Every job's noise from its own CPU generator (the same noise for a seed on any
        # device), in the stock pipeline's order and shapes: the initial latents, then
        # each draw the sampler makes in `step` (noise_draws), all before the first step.
        draws = engine._noise_plan(params.scheduler, self.steps, dtype)
        initial, drawn = [], []
        for job in jobs:
            generator = torch.Generator(device="cpu").manual_seed(job.params.seed)
            shape = (job.n, *self.sample_shape)
            initial.append(randn_tensor(shape, generator=generator, device="cpu", dtype=dtype))
            job_draws = [
                randn_tensor(shape, generator=generator, device="cpu", dtype=draw_dtype)
                for _, draw_dtype in draws
            ]
            if job_draws:
                drawn.append(torch.stack(job_draws))
        latents = engine._to_device(_padded(torch.cat(initial), self.padded))
        # Scaled by the batch's scheduler: init_noise_sigma depends on its timesteps.
        self.latents = latents * scheduler.init_noise_sigma
        self.noise = NoiseSource(
            engine._to_device(_padded(torch.cat(drawn, 1), self.padded, 1)) if drawn else []
        )
        self.step_kwargs = step_kwargs(scheduler, self.noise)
        self._build_kept(jobs)
        if guided:
            # float32: a float16 noise difference times a float32 scale, rounded back to
            # float16, is what the stock pipeline's Python-float scale computes.
            self.text_scale = self._per_sample([job.params.guidance_scale for job in jobs])
            self.image_scale = self._per_sample([job.params.image_guidance_scale for job in jobs])
        self._build_conditioning()

    @staticmethod
    def _spans(jobs: list[_Job]) -> dict[int, tuple[int, int]]:
        spans, start = {}, 0
        for job in jobs:
            spans[id(job)] = (start, start + job.n)
            start += job.n
        return spans

    def _build_kept(self, jobs: list[_Job]) -> None:
        """Blended latent diffusion for masked jobs (Avrahami et al., "Blended Latent
        Diffusion"; diffusers' inpainting pipeline does the same for 4-channel UNets):
        after every step, latents outside the mask are replaced by the input image's own
        latents noised to the next step, so the edit grows only inside the mask and meets
        the kept area along its boundary. The noised image latents of every step are
        computed here, up front, for the whole batch; jobs without a mask are editable
        everywhere (1 * x + 0 * kept is x, exactly)."""
        self.kept = self.editable = self.keep_weight = None
        if all(job.request.mask is None for job in jobs):
            return
        engine, family = self.engine, self.engine.family
        device, dtype = engine.device, self.dtype
        editable, image, noise = [], [], []
        for job in jobs:
            shape = (job.n, *self.sample_shape)
            if job.request.mask is None:
                editable.append(torch.ones((job.n, 1, *shape[-2:]), device=device, dtype=dtype))
                image.append(torch.zeros(shape, device=device, dtype=dtype))
                noise.append(torch.zeros(shape, device=device, dtype=dtype))
                continue
            mask = engine._latent_mask(job.request.mask, job.image_latents).to(dtype)
            editable.append(mask.expand(job.n, -1, -1, -1))
            image.append(family.denoised_latents(job.image_latents).repeat(job.n, 1, 1, 1))
            # From a generator of its own: the job's stream, which the sampler draws from
            # too, stays the one it has without a mask.
            noise.append(
                randn_tensor(
                    shape, generator=_mask_generator(job.params.seed), device=device, dtype=dtype
                )
            )
        padded = self.padded
        self.editable = _padded(torch.cat(editable), padded)
        self.keep_weight = 1 - self.editable
        image = _padded(torch.cat(image), padded)
        noise = _padded(torch.cat(noise), padded)
        # A scheduler of its own that searches its timesteps for each one (add_noise
        # does, a sync it may do here but not in the loop).
        noising = self.engine._new_scheduler(jobs[0].params.scheduler)
        noising.set_timesteps(self.steps, device="cpu")
        kept = [noising.add_noise(image, noise, t.reshape(1)) for t in self.timesteps[1:]]
        self.kept = torch.stack([*kept, image])  # after the last step: the image itself

    def _build_conditioning(self) -> None:
        """The model input buffer (its image-latent channels filled in once; each step
        writes only the scaled latents) and the text conditioning of every branch."""
        engine, jobs, padded = self.engine, self.jobs, self.padded
        device, dtype = engine.device, self.dtype
        image = torch.cat([job.image_latents.expand(job.n, -1, -1, -1) for job in jobs])
        image = _padded(image, padded)
        text = self._text([job.text for job in jobs])
        if self.guided:
            negative = self._text([job.negative for job in jobs])
            # Branches [text, image, uncond]: the text branch sees prompt and image, the
            # image branch the image alone, the unconditional branch neither.
            image = torch.cat([image, image, torch.zeros_like(image)])
            text = TextConditioning.cat([text, negative, negative])
        channels = self.sample_shape[0]
        self.model_input = torch.empty(
            (self.branches * padded, channels + image.shape[1], *image.shape[-2:]),
            device=device,
            dtype=dtype,
        )
        self.model_input[:, channels:] = image
        # Each branch's rows of latent channels, written by one copy per step.
        self.latent_input = self.model_input.unflatten(0, (self.branches, padded))[:, :, :channels]
        self.conditioning = engine.family.unet_conditioning(text, self.size)

    def _text(self, items: list[TextConditioning]) -> TextConditioning:
        pairs = zip(items, self.jobs, strict=True)
        rows = TextConditioning.cat([item.repeat(job.n) for item, job in pairs])
        pooled = None if rows.pooled is None else _padded(rows.pooled, self.padded)
        return TextConditioning(_padded(rows.hidden_states, self.padded), pooled)

    def _per_sample(self, values: list[float]) -> torch.Tensor:
        pairs = zip(values, self.jobs, strict=True)
        repeated = [value for value, job in pairs for _ in range(job.n)]
        repeated += [1.0] * (self.padded - len(repeated))
        scales = torch.tensor(repeated, dtype=torch.float32).view(-1, 1, 1, 1)
        return self.engine._to_device(scales)

    def drop(self, leaving: list[_Job]) -> None:
        """Take jobs out of the batch: every per-sample tensor, and the scheduler's
        per-sample state, keeps the rows of the jobs that stay (padded to the bucket of
        their outputs), and the conditioning is built again for them. Slices and
        concatenations only, so this too runs without a host-device sync."""
        gone = {id(job) for job in leaving}
        jobs = [job for job in self.jobs if id(job) not in gone]
        self.jobs = jobs
        if not jobs:
            return
        spans = [self.spans[id(job)] for job in jobs]
        old_padded, padded = self.padded, self.engine.padded_size(sum(job.n for job in jobs))
        self.latents = _take(self.latents, spans, padded)
        if len(self.noise.draws):
            self.noise.draws = _take(self.noise.draws, spans, padded, 1)
        if self.guided:
            self.text_scale = _take(self.text_scale, spans, padded)
            self.image_scale = _take(self.image_scale, spans, padded)
        if self.kept is not None:
            self.editable = _take(self.editable, spans, padded)
            self.keep_weight = 1 - self.editable
            self.kept = _take(self.kept, spans, padded, 1)
        _take_scheduler_state(self.scheduler, old_padded, self.sample_shape, spans, padded)
        self.padded = padded
        self.spans = self._spans(jobs)
        self._build_conditioning()

    def samples(self, job: _Job) -> torch.Tensor:
        start, stop = self.spans[id(job)]
        return self.latents[start:stop]


def _take_scheduler_state(
    scheduler, rows: int, sample_shape: tuple, spans: list[tuple[int, int]], size: int
) -> None:
    """Keep the rows `spans` of every per-sample tensor a scheduler holds (DPM++'s and
    UniPC's model output histories, UniPC's last sample): those of `rows` samples of
    `sample_shape`, alone or in a list."""

    def per_sample(value) -> bool:
        return (
            isinstance(value, torch.Tensor)
            and value.dim() == len(sample_shape) + 1
            and value.shape[0] == rows
            and tuple(value.shape[1:]) == tuple(sample_shape)
        )

    for name, value in list(vars(scheduler).items()):
        if per_sample(value):
            setattr(scheduler, name, _take(value, spans, size))
        elif isinstance(value, list) and any(per_sample(item) for item in value):
            setattr(
                scheduler,
                name,
                [_take(item, spans, size) if per_sample(item) else item for item in value],
            )


class EditEngine:
    def __init__(self, model_path: str, options: EngineOptions | None = None) -> None:
        self.model_path = model_path
        self.options = options or EngineOptions()
        self.pipe = None
        self.family: ModelFamily | None = None
        self.info: EngineInfo | None = None
        self._embeds: OrderedDict[tuple, tuple] = OrderedDict()
        # One scheduler per sampler, built from the model's config once; batches get copies.
        self._schedulers: dict[Scheduler, object] = {}
        self._noise_plans: dict[tuple, list] = {}
        # The UNet batch sizes are counted in outputs ("samples"): at most max(max_batch,
        # MAX_OUTPUTS) per UNet call, so one job's outputs always fit.
        self.max_samples = max(self.options.max_batch, MAX_OUTPUTS)
        below = {b for b in self.options.batch_buckets if b < self.max_samples}
        self.batch_buckets = tuple(sorted(below | {self.max_samples}))
        # Batches are padded to batch buckets for a compiled UNet, whose every new shape is
        # a compile; an eager one runs a batch at its own size, padding being wasted work.
        self.pads_batches = self.options.compile_unet
        # Graphs the compiled UNet holds, UNet compiles after warm-up (each one logged).
        self.unet_graphs = 0
        self.recompiles = 0
        self.warmup_pairs: list[WarmupPair] = []
        self._warm = False
        # LoRA adapters on the model (services/gpu_worker/adapters.py), made with the
        # pipeline; where their weights are comes from `set_adapter_resolver`.
        self.adapters: AdapterCache | None = None
        self._adapter_resolve: Resolve | None = None

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
        if self.options.vae_tiling:
            pipe.vae.enable_tiling()
        self.pipe = pipe
        self.family = family
        self.adapters = AdapterCache(pipe, self.options.adapter_cache_size, self._adapter_resolve)
        self.resolution = self.options.resolution or family.resolution()
        if self.options.compile_unet:
            self._compile_unet()
        self.info = EngineInfo(
            model=self.model_path,
            family=family.name,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            attention=attention,
            compiled=self.options.compile_unet,
            max_batch=self.options.max_batch,
            resolution=self.resolution,
            batch_buckets=list(self.batch_buckets) if self.pads_batches else None,
        )
        log.info("edit engine loaded: %s", self.info)
        return self.info

    def _compile_unet(self) -> None:
        """torch.compile of the UNet as one graph (`fullgraph`) per input shape, shapes
        static (`dynamic=False`): with padded batches and resolution buckets there are
        few, each compiled and warmed at start (`warmup`), and each gets its own CUDA
        graphs under "reduce-overhead". It pays off on CUDA (fused kernels, CUDA graphs);
        it also works on CPU, which is how the tests check that it changes no output."""
        pipe = self.pipe
        pipe.unet = torch.compile(
            pipe.unet, mode=self.options.compile_mode, fullgraph=True, dynamic=False
        )
        # Dynamo gives up compiling a function after `recompile_limit` graphs and runs it
        # eagerly from then on, silently; every shape this engine can run must fit.
        shapes = len(resolution_buckets(self.resolution)) * len(self.unet_batch_sizes())
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), shapes + 8))

    def set_adapter_resolver(self, resolve: Resolve) -> None:
        """Where adapters' weights are: adapter id -> ResolvedAdapter (the runner passes
        one that reads the adapter store)."""
        self._adapter_resolve = resolve
        if self.adapters is not None:
            self.adapters.resolve = resolve

    def _activate_adapter(self, adapter_id: str | None) -> None:
        """The batch's adapter, active (loaded first when it is not), or none. With a
        compiled UNet, LoRA layers change its graph: the first batch of each adapter
        setup recompiles (counted and logged as recompiles)."""
        if self.adapters is None:
            if adapter_id is None:
                return
            raise AdapterUnavailable(adapter_id, "is not supported by this engine")
        self.adapters.activate(adapter_id)

    def _select_attention(self, pipe, device: torch.device) -> str:
        choice = "sliced" if self.options.attention_slicing else self.options.attention
        if choice == "sliced":
            pipe.enable_attention_slicing()
            return "sliced"
        if choice == "xformers":
            if self.options.compile_unet:
                # Its kernels are opaque to dynamo: a fullgraph compile would fail on them.
                log.warning("xformers breaks torch.compile's UNet graph; using PyTorch SDPA")
            elif device.type != "cuda":
                log.warning("xformers needs CUDA; using PyTorch SDPA on %s", device)
            else:
                try:
                    import xformers  # noqa: F401

                    pipe.enable_xformers_memory_efficient_attention()
                    return "xformers"
                except Exception as exc:  # not installed, or no kernel for this GPU
                    log.warning("xformers unavailable (%s); using PyTorch SDPA", exc)
        # diffusers' default processors call torch's scaled_dot_product_attention, which
        # picks the flash or memory-efficient kernel on CUDA.
        return "sdpa"

    def bucket_for(self, width: int, height: int) -> tuple[int, int]:
        """The resolution bucket an image of this size runs at on this engine."""
        return bucket_for(width, height, self.resolution)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    # -- shapes --------------------------------------------------------------------------

    def padded_size(self, samples: int) -> int:
        """The number of samples a batch of `samples` outputs runs as."""
        if not self.pads_batches:
            return samples
        return next(size for size in self.batch_buckets if size >= samples)

    def unet_batch_sizes(self) -> list[int]:
        """Every UNet batch size this engine can run: each batch bucket, unguided (one
        branch) and guided (three)."""
        return sorted({b * branches for b in self.batch_buckets for branches in (1, 3)})

    def warmup_plan(
        self,
        sizes: list[tuple[int, int]] | tuple[int, int] | None = None,
        batch_sizes: list[int] | None = None,
        guidance: list[bool] | None = None,
    ) -> list[tuple[tuple[int, int], bool, int]]:
        """(resolution bucket, guided, outputs) for every batch `warmup` runs.

        By default, from `warmup_buckets`: with a compiled UNet every resolution bucket of
        the engine (or those named), each at every batch bucket, guided and not, so that
        nothing compiles after start; with an eager one, the square bucket at one output,
        guided (cuDNN's and the allocator's first-call costs)."""
        if sizes is None:
            sizes = self._warmup_buckets()
        elif isinstance(sizes, tuple):
            sizes = [sizes]
        compiled = self.options.compile_unet
        if batch_sizes is None:
            batch_sizes = list(self.batch_buckets) if compiled else [1]
        if guidance is None:
            guidance = [True, False] if compiled else [True]
        samples = sorted({self.padded_size(min(b, self.max_samples)) for b in batch_sizes})
        return [
            (self.bucket_for(*size), guided, n)
            for size in sizes
            for guided in guidance
            for n in samples
        ]

    def _warmup_buckets(self) -> list[tuple[int, int]]:
        named = self.options.warmup_buckets
        if named == "all" or (named is None and self.options.compile_unet):
            return list(resolution_buckets(self.resolution))
        if named is None:
            return [self.bucket_for(1, 1)]
        sizes = []
        for item in named.split(","):
            width, height = (int(side) for side in item.split("x"))
            bucket = self.bucket_for(width, height)
            if bucket != (width, height):
                log.warning("warm-up size %s is not a bucket; warming %dx%d", item, *bucket)
            sizes.append(bucket)
        return list(dict.fromkeys(sizes))

    def warmup(
        self,
        sizes: list[tuple[int, int]] | tuple[int, int] | None = None,
        batch_sizes: list[int] | None = None,
        guidance: list[bool] | None = None,
        on_pair: Callable[[WarmupPair], None] | None = None,
    ) -> EngineInfo:
        """Run every shape in use once (`warmup_plan`), so that compilation, CUDA graph
        capture, cuDNN autotuning and allocator growth happen before the first user
        request, not during it. `on_pair` gets each shape's figures as soon as it ran.
        Returns `info` with the warm-up time (`warmup_s`), which /readyz shows."""
        plan = self.warmup_plan(sizes, batch_sizes, guidance)
        started = time.perf_counter()
        for size, guided, samples in plan:
            scale = 7.5 if guided else 1.0
            image_scale = 1.5 if guided else 1.0
            image = Image.new("RGB", size, (128, 128, 128))
            requests = [
                EditRequest(
                    image,
                    EditParams(
                        prompt="warm up",
                        num_inference_steps=WARMUP_STEPS,
                        guidance_scale=scale,
                        image_guidance_scale=image_scale,
                        seed=i,
                    ),
                )
                for i in range(samples)
            ]
            graphs = self.unet_graphs
            pair_started = time.perf_counter()
            self.predict_batch(requests)
            self._synchronize()
            pair = WarmupPair(
                size=size,
                samples=samples,
                guided=guided,
                unet_batch=samples * (3 if guided else 1),
                seconds=round(time.perf_counter() - pair_started, 3),
                graphs=self.unet_graphs - graphs,
            )
            self.warmup_pairs.append(pair)
            log.info(
                "warm-up: %dx%d, %d output(s), %s: %.2f s, %d graph(s) compiled",
                *size,
                samples,
                "guided" if guided else "unguided",
                pair.seconds,
                pair.graphs,
            )
            if on_pair is not None:
                on_pair(pair)
        self._warm = True
        seconds = round(time.perf_counter() - started, 3)
        compiled = self.options.compile_unet
        self.info = self.info.model_copy(
            update={"warmup_s": seconds, "unet_graphs": self.unet_graphs if compiled else None}
        )
        log.info(
            "edit engine warmed up in %.1f s: %d shape(s)%s",
            seconds,
            len(plan),
            f", {self.unet_graphs} UNet graph(s) compiled" if compiled else "",
        )
        return self.info

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

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
        UNet steps end the whole batch and propagate.

        Jobs whose outputs add up to more than `max_samples` run as consecutive batches
        of at most that many outputs, in order."""
        if self.pipe is None:
            raise RuntimeError("EditEngine.setup() was not called")
        keys = {batch_key(r.image.size, r.params) for r in requests}
        if len(keys) != 1:
            raise ValueError(f"requests do not share one batch key: {sorted(keys)}")
        outcomes: list[list[Image.Image] | BaseException | None] = [None] * len(requests)
        for chunk in self._chunks(requests):
            results = self._run([requests[i] for i in chunk])
            for index, result in zip(chunk, results, strict=True):
                outcomes[index] = result
        return outcomes  # type: ignore[return-value]

    def _chunks(self, requests: list[EditRequest]) -> list[list[int]]:
        chunks: list[list[int]] = []
        samples = self.max_samples
        for index, request in enumerate(requests):
            n = request.params.num_outputs
            if not chunks or samples + n > self.max_samples:
                chunks.append([])
                samples = 0
            chunks[-1].append(index)
            samples += n
        return chunks

    def _run(self, requests: list[EditRequest]) -> list[list[Image.Image] | BaseException]:
        guided = uses_guidance(requests[0].params)
        # The batch's adapter (the batch key's: every request has it) before any encoding:
        # an adapter may have text encoder layers too.
        adapter = requests[0].params.adapter
        self._activate_adapter(adapter)
        jobs: list[_Job] = []
        outcomes: list[_Job | BaseException] = []
        for request in requests:
            try:
                text, negative = self._encode_prompt(
                    request.params.prompt, request.params.negative_prompt, guided, adapter
                )
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise  # a bug, not this job's problem: fail loudly
                outcomes.append(exc)
                continue
            job = _Job(request, text, negative)
            jobs.append(job)
            outcomes.append(job)
        self._encode_images(jobs)
        active = [job for job in jobs if job.outcome is None]
        if active:
            batch = _Batch(self, active, guided)
            graphs = self._graph_count()
            try:
                self._denoise(batch)
            finally:
                self._count_graphs(graphs, batch)
            self._decode(batch.jobs, batch)
        return [item if isinstance(item, BaseException) else item.outcome for item in outcomes]

    def _denoise(self, batch: _Batch) -> None:
        """The denoising loop.

        Sync-free by construction: nothing in it reads a device tensor on the host (no
        `.item()`, `.cpu()`, `.tolist()`, no `torch.tensor` of Python lists, no Python
        branch on tensor values), so the host only queues work and the GPU never waits
        for it. Every tensor a step needs was built before the loop (`_Batch`); the
        schedulers' own scalars (sigmas, alphas) live on the host and enter the device's
        kernels as arguments; their step index is a Python counter
        (`start_at_first_step`); their noise comes from a NoiseSource of draws already on
        the device. Where a CUDA device runs it with `sync_debug`, any sync raises.
        Remaining syncs inside diffusers that this cannot remove: UniPC's step copies its
        sigmas to the device (`.to(device)`) and solves its corrector's 2x2 system with
        `torch.linalg.solve`, whose error check reads the device; the other samplers
        (Euler ancestral, Euler, DPM++ 2M, DDIM, LCM) step without one.
        """
        family, scheduler = self.family, batch.scheduler
        cuda_graphs = self.options.compile_unet and self.options.compile_mode in CUDA_GRAPH_MODES
        with self._sync_debug():
            # No host-device sync from here to the end of the loop: no .item(), .cpu(),
            # .tolist(), torch.tensor(<Python list>) or branch on a tensor's value
            # (tests/gpu_worker/test_engine_steps.py checks it on CPU).
            for i, t in enumerate(batch.timesteps):
                scaled = scheduler.scale_model_input(batch.latents, t)
                batch.latent_input.copy_(scaled.expand(batch.branches, *scaled.shape))
                if self.options.compile_unet:
                    torch.compiler.cudagraph_mark_step_begin()
                noise = family.predict_noise(
                    batch.model_input, batch.unet_timesteps[i], batch.conditioning
                )
                if batch.guided:
                    noise_text, noise_image, noise_uncond = noise.chunk(3)
                    # Per-sample scales: each job keeps its own S_T and S_I in the batch.
                    noise = (
                        noise_uncond
                        + (batch.text_scale * (noise_text - noise_image)).to(noise.dtype)
                        + (batch.image_scale * (noise_image - noise_uncond)).to(noise.dtype)
                    )
                elif cuda_graphs:
                    noise = noise.clone()  # the next replay overwrites the graph's output
                batch.latents = batch.step(
                    scheduler, noise, t, batch.latents, **batch.step_kwargs, return_dict=False
                )[0]
                if batch.kept is not None:
                    batch.latents = (
                        batch.editable * batch.latents + batch.keep_weight * batch.kept[i]
                    )
                leaving = []
                for job in batch.jobs:
                    if job.request.on_step is None:
                        continue
                    try:
                        job.request.on_step(i + 1, batch.steps)
                    except LeaveBatch as exc:
                        job.outcome = exc
                        leaving.append(job)
                if leaving:
                    batch.drop(leaving)
                    if not batch.jobs:
                        break

    @contextlib.contextmanager
    def _sync_debug(self) -> Iterator[None]:
        if not (self.options.sync_debug and self.device.type == "cuda"):
            yield
            return
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    def _graph_count(self) -> int:
        if not self.options.compile_unet:
            return 0
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def _count_graphs(self, before: int, batch: _Batch) -> None:
        new = self._graph_count() - before
        if new <= 0:
            return
        self.unet_graphs += new
        if self._warm:
            self.recompiles += new
            observe_unet_recompiles(new)
            log.warning(
                "the UNet compiled %d new graph(s) after warm-up, for %dx%d at %d output(s), "
                "%s (warm-up covered %d shapes; see INSTRUCTEDIT_WARMUP_BUCKETS)",
                new,
                *batch.size,
                batch.padded,
                "guided" if batch.guided else "unguided",
                len(self.warmup_pairs),
            )

    # -- the batch's ends: encode and decode ---------------------------------------------

    def _encode_images(self, jobs: list[_Job]) -> None:
        """Every job's image latents in one VAE call; when that runs out of memory, one
        call per job, a job whose own call does failing alone."""
        if not jobs:
            return
        if len(jobs) > 1:
            try:
                latents = self.family.encode_images([job.request.image for job in jobs])
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                log.warning("batched VAE encode ran out of memory; encoding image by image")
            else:
                for job, row in zip(jobs, latents.split(1), strict=True):
                    job.image_latents = row
                return
        for job in jobs:
            try:
                job.image_latents = self.family.encode_image(job.request.image)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                job.outcome = exc

    def _decode(self, jobs: list[_Job], batch: _Batch) -> None:
        """Every job's outputs in one VAE decode, made 8-bit on the device and copied to
        the host at once; when that runs out of memory, job by job."""
        if not jobs:
            return
        if len(jobs) > 1:
            try:
                pixels = self.family.decode_uint8(torch.cat([batch.samples(job) for job in jobs]))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                log.warning("batched VAE decode ran out of memory; decoding job by job")
            else:
                images = [Image.fromarray(array) for array in pixels.cpu().numpy()]
                start = 0
                for job in jobs:
                    job.outcome = images[start : start + job.n]
                    start += job.n
                return
        for job in jobs:
            try:
                job.outcome = self.decode(batch.samples(job))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                job.outcome = exc

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return self.family.decode(latents)

    # -- per-batch helpers ---------------------------------------------------------------

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device: pinned and copied without blocking on CUDA."""
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _noise_plan(self, name: Scheduler, steps: int, dtype: torch.dtype) -> list:
        key = (name, steps, dtype)
        plan = self._noise_plans.get(key)
        if plan is None:
            plan = self._noise_plans[key] = noise_draws(self._template(name), steps, dtype)
        return plan

    def _latent_mask(self, mask: Image.Image, like: torch.Tensor) -> torch.Tensor:
        """The mask at the latents' size, (1, 1, h, w): a latent may change when any pixel
        it covers may. Editable latents a little past the mask's edge let the edit reach
        it; the pixel composite afterwards keeps every pixel outside exactly."""
        pixels = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
        pixels = pixels.to(like.device)[None, None]
        return (torch.nn.functional.adaptive_max_pool2d(pixels, like.shape[-2:]) > 0).float()

    def _template(self, name: Scheduler):
        template = self._schedulers.get(name)
        if template is None:
            template = self._schedulers[name] = build_scheduler(name, self.pipe.scheduler.config)
        return template

    def _new_scheduler(self, name: Scheduler):
        """A fresh scheduler of the sampler: each batch steps its own state."""
        return copy.deepcopy(self._template(name))

    def _encode_prompt(
        self, prompt: str, negative_prompt: str | None, cfg: bool, adapter: str | None = None
    ) -> tuple[TextConditioning, TextConditioning | None]:
        """The family's conditioning for (prompt, negative), cached: catalog edits repeat
        the same instructions, and the empty negative prompt is in nearly every job. Keyed
        by the adapter's loaded revision too: an adapter with text encoder layers encodes
        prompts its own way (and one registered again may encode them anew)."""
        key: tuple = (prompt, negative_prompt, cfg)
        if adapter is not None and self.adapters is not None:
            key = (self.adapters.active, *key)
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
