"""Image pairs from caption pairs: Stable Diffusion + Prompt-to-Prompt.

For each pair the input image is Stable Diffusion text-to-image of the input caption and
the output image comes from the output caption with the same seed and initial noise,
the output branch using the input branch's attention maps during the first fraction p of
the steps (``prompt_to_prompt``). Both branches, both classifier-free-guidance halves and
up to ``max_pairs_per_batch`` candidates of a row go through the UNet in one call per
step.

    generator = PairGenerator(PairGeneratorConfig(model="path/or/hub-id"))
    generator.setup()                      # load once per worker process
    params = pair_params_for_row(run_seed, row.index)
    pairs = generator.generate_row(row, params)
    pairs = generator.generate_row(row, params, num_inference_steps=20, height=256, width=256)
    # InstructPix2Pix's recipe: many candidates, judged batch by batch, the first
    # ``keep`` that pass are kept and generation stops there.
    result = generator.generate_candidates(row, params, judge=judge, keep=4)

Steps, image size, sampler, negative prompt, cross-attention fraction and batch size are
the config's defaults and can be given per call: one loaded pipeline serves runs that
differ only in those (``get_pair_generator``).

Each branch has its own scheduler instance and its own CPU generator seeded with the pair
seed, so each branch is stepped exactly as ``StableDiffusionPipeline`` would step it
alone: with p = 0 the input image is plain text-to-image of the input caption and the
output image plain text-to-image of the output caption, for any scheduler (stochastic
ones draw the same noise in both branches).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image

from services.common.diffusion import (
    decode_latents,
    load_pipeline,
    resolve_device,
    serving_dtype,
    step_kwargs,
)
from services.common.settings import DEFAULT_DATAGEN_MODEL, Settings, get_settings
from services.datagen.pair_params import EditRow, ImagePair, PairParams
from services.datagen.prompt_to_prompt import (
    ALL_SELF_ATTENTION,
    AttentionController,
    InjectionLayers,
    injected_step_count,
    shared_token_map,
)

__all__ = [
    "Judge",
    "PairGenerator",
    "PairGeneratorConfig",
    "PairGeneratorInfo",
    "RowCandidates",
    "get_pair_generator",
    "load_text_to_image_pipeline",
]

log = logging.getLogger(__name__)

DECODE_BATCH = 8
# InstructPix2Pix's generate_img_dataset.py: --steps 100.
DEFAULT_STEPS = 100

# on_step(done, total): after every denoising step of a generate_row call. An exception
# raised in it (a cancellation) stops the generation at once and propagates.
StepCallback = Callable[[int, int], None]

# judge(pairs) -> (the pairs with their scores attached, whether each passes), in order.
Judge = Callable[[list[ImagePair]], tuple[list[ImagePair], list[bool]]]


NO_MODEL_HINT = (
    "Set INSTRUCTEDIT_DATAGEN_MODEL to a local copy of a Stable Diffusion 1.x pipeline (a "
    "directory with model_index.json), or generate a tiny offline one with "
    "`python -m services.datagen.tiny_sd DIR`."
)


@dataclass(frozen=True, slots=True)
class PairGeneratorConfig:
    # Hub id or local directory of a Stable Diffusion 1.x-compatible text-to-image pipeline.
    model: str = DEFAULT_DATAGEN_MODEL
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_inference_steps: int = DEFAULT_STEPS
    # Image size; None = the model's native size (512 for SD 1.x). Multiples of 8.
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""
    # A sampler name of ``services.common.schedulers`` ("euler_ancestral", "ddim", ...) or
    # a diffusers scheduler class name ("EulerAncestralDiscreteScheduler", ...), built
    # from the model's scheduler config; None = the model's own scheduler.
    scheduler: str | None = None
    # Prompt-to-Prompt layers (regex over attention layer names; None = none).
    self_attention_layers: str | None = ALL_SELF_ATTENTION
    cross_attention_layers: str | None = None
    # Fraction of the steps in which cross-attention (the conditional half only) is
    # injected, when cross_attention_layers is set; None = each pair's own p.
    cross_attention_fraction: float | None = None
    # Candidates of one row denoised in one UNet batch (4 UNet rows each).
    max_pairs_per_batch: int = 4

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides) -> PairGeneratorConfig:
        """Model and device from ``INSTRUCTEDIT_DATAGEN_MODEL`` / ``INSTRUCTEDIT_DEVICE``."""
        settings = settings or get_settings()
        return cls(**{"model": settings.datagen_model, "device": settings.device, **overrides})

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        if self.max_pairs_per_batch < 1:
            raise ValueError("max_pairs_per_batch must be >= 1")
        fraction = self.cross_attention_fraction
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"cross_attention_fraction must be in [0, 1], got {fraction}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {value}")


@dataclass(frozen=True, slots=True)
class _Render:
    """What one generate call renders: steps, image size, sampler, negative prompt,
    cross-attention fraction and candidates per UNet batch."""

    num_inference_steps: int
    height: int
    width: int
    scheduler: str | None = None
    negative_prompt: str = ""
    cross_attention_fraction: float | None = None
    batch_size: int = 4


@dataclass(frozen=True, slots=True)
class RowCandidates:
    """What ``generate_candidates`` made of one row."""

    # The passing candidates kept, in candidate order, at most ``keep``.
    kept: list[ImagePair]
    # Every candidate generated, in candidate order (scored when judged); the pictures
    # of those not kept are dropped (b"") to bound the memory of a 100-candidate row.
    generated: list[ImagePair]
    # UNet batches run (each of up to batch_size candidates, all steps).
    batches: int


def scheduler_class_and_options(name: str):
    """The diffusers class and options of a sampler name (``services.common.schedulers``)
    or of a diffusers scheduler class name."""
    import diffusers

    from services.common.schedulers import SCHEDULERS, Scheduler

    if name in Scheduler.__members__.values():
        class_name, options = SCHEDULERS[Scheduler(name)]
        return getattr(diffusers, class_name), options
    scheduler_class = getattr(diffusers, name, None)
    if not (
        isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)
    ):
        raise ValueError(f"unknown diffusers scheduler {name!r}")
    return scheduler_class, {}


@dataclass(frozen=True, slots=True)
class PairGeneratorInfo:
    model: str
    device: str
    dtype: str
    scheduler: str
    height: int
    width: int
    controlled_layers: int


def load_text_to_image_pipeline(model: str, dtype: torch.dtype):
    """``StableDiffusionPipeline`` from a local directory or a Hub id (downloaded into the
    Hugging Face cache once), without safety checker."""
    from diffusers import StableDiffusionPipeline

    return load_pipeline(
        StableDiffusionPipeline,
        model,
        dtype,
        NO_MODEL_HINT,
        # Product photos, not open-ended generation: the checker would blank outputs.
        safety_checker=None,
        requires_safety_checker=False,
    )


class PairGenerator:
    """Loads a Stable Diffusion 1.x pipeline once (``setup``) and turns caption pairs into
    image pairs (``generate``, ``generate_row``)."""

    def __init__(self, config: PairGeneratorConfig | None = None, pipeline=None) -> None:
        """``pipeline``: an already built ``StableDiffusionPipeline`` to use instead of
        loading ``config.model`` (benchmarks, tests)."""
        self.config = config or PairGeneratorConfig()
        self._given_pipeline = pipeline
        self.pipe = None
        self.controller = AttentionController(
            InjectionLayers(self.config.self_attention_layers, self.config.cross_attention_layers)
        )
        self.info: PairGeneratorInfo | None = None

    # -- setup -------------------------------------------------------------------------

    def setup(self) -> PairGeneratorInfo:
        if self.info is not None:
            return self.info
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        device = resolve_device(self.config.device)
        dtype = serving_dtype(device)
        pipe = self._given_pipeline
        if pipe is None:
            pipe = load_text_to_image_pipeline(self.config.model, dtype)
        if pipe.unet.dtype != dtype:  # a given pipeline; loaded ones already have it
            pipe.to(dtype=dtype)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if self.config.scheduler is not None:
            scheduler_class, options = scheduler_class_and_options(self.config.scheduler)
            pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **options)
        controlled = self.controller.install(pipe.unet)
        self.pipe = pipe
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.info = PairGeneratorInfo(
            model=self.config.model if self._given_pipeline is None else "<in-memory pipeline>",
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            scheduler=type(pipe.scheduler).__name__,
            height=self.config.height or native,
            width=self.config.width or native,
            controlled_layers=len(controlled),
        )
        log.info("pair generator ready: %s", self.info)
        return self.info

    def _require_pipe(self):
        if self.pipe is None:
            raise RuntimeError("PairGenerator.setup() was not called")
        return self.pipe

    @property
    def device(self) -> torch.device:
        return self._require_pipe().device

    def _render(
        self,
        num_inference_steps: int | None,
        height: int | None,
        width: int | None,
        scheduler: str | None = None,
        negative_prompt: str | None = None,
        cross_attention_fraction: float | None = None,
        batch_size: int | None = None,
    ) -> _Render:
        """Per-call options, the config's (and the model's native size) by default."""
        info = self.info
        if info is None:
            raise RuntimeError("PairGenerator.setup() was not called")
        steps = num_inference_steps
        if steps is None:
            steps = self.config.num_inference_steps
        if steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        for name, value in (("height", height), ("width", width)):
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {value}")
        if scheduler is not None:
            scheduler_class_and_options(scheduler)  # a bad name fails before any work
        fraction = cross_attention_fraction
        if fraction is None:
            fraction = self.config.cross_attention_fraction
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"cross_attention_fraction must be in [0, 1], got {fraction}")
        if fraction and self.config.cross_attention_layers is None:
            raise ValueError("a cross-attention fraction needs cross_attention_layers")
        batch = batch_size or self.config.max_pairs_per_batch
        if batch < 1:
            raise ValueError("batch_size must be >= 1")
        return _Render(
            steps,
            height or info.height,
            width or info.width,
            scheduler if scheduler is not None else self.config.scheduler,
            self.config.negative_prompt if negative_prompt is None else negative_prompt,
            fraction,
            batch,
        )

    def _cross_steps(self, render: _Render, p: float, steps: int) -> int:
        """Steps in which a pair of fraction ``p`` has its cross-attention injected."""
        if self.config.cross_attention_layers is None:
            return 0
        fraction = p if render.cross_attention_fraction is None else render.cross_attention_fraction
        return injected_step_count(fraction, steps)

    # -- generation ----------------------------------------------------------------------

    def generate(self, row: EditRow, params: PairParams, **options) -> ImagePair:
        """One image pair of ``row``."""
        return self.generate_row(row, [params], **options)[0]

    def generate_row(
        self,
        row: EditRow,
        params: Sequence[PairParams],
        on_step: StepCallback | None = None,
        **options,
    ) -> list[ImagePair]:
        """The image pairs of ``row``, one per ``params`` entry, in that order. Options
        (``num_inference_steps``, ``height``, ``width``, ``scheduler``,
        ``negative_prompt``, ``cross_attention_fraction``, ``batch_size``): the config's
        unless given."""
        return self.generate_candidates(row, params, on_step=on_step, **options).generated

    def generate_candidates(
        self,
        row: EditRow,
        params: Sequence[PairParams],
        judge: Judge | None = None,
        keep: int | None = None,
        on_step: StepCallback | None = None,
        *,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        negative_prompt: str | None = None,
        cross_attention_fraction: float | None = None,
        batch_size: int | None = None,
    ) -> RowCandidates:
        """Candidates of ``row`` in candidate order, ``batch_size`` per UNet batch; each
        batch is judged as soon as it is decoded (``judge``; None: every candidate
        passes), and generation stops after the batch in which the ``keep``-th passing
        candidate appeared (None: all are made). The first ``keep`` passing candidates,
        in candidate order, are kept: deterministic for a given run seed and row."""
        self._require_pipe()
        render = self._render(
            num_inference_steps,
            height,
            width,
            scheduler,
            negative_prompt,
            cross_attention_fraction,
            batch_size,
        )
        if keep is not None and keep < 1:
            raise ValueError("keep must be >= 1")
        size = render.batch_size
        chunks = [params[start : start + size] for start in range(0, len(params), size)]
        steps = self.count_denoising_steps(render.num_inference_steps, render.scheduler)
        # An upper bound: an early stop ends the row before the last batch.
        total = steps * len(chunks)
        kept: list[ImagePair] = []
        generated: list[ImagePair] = []
        batches = 0
        for number, chunk in enumerate(chunks):

            def chunk_step(done: int, _total: int, offset: int = number * steps) -> None:
                if on_step is not None:
                    on_step(offset + done, total)

            latents = self._denoise(row, chunk, render, on_step=chunk_step)
            batches += 1
            images = self.decode(latents.flatten(0, 1))
            pairs = [
                ImagePair.from_row(
                    row,
                    pair_params,
                    num_inference_steps=render.num_inference_steps,
                    injected_steps=injected_step_count(pair_params.p, steps),
                    denoising_steps=steps,
                    input_image=images[2 * index],
                    edited_image=images[2 * index + 1],
                )
                for index, pair_params in enumerate(chunk)
            ]
            passed = [True] * len(pairs)
            if judge is not None:
                pairs, passed = judge(pairs)
                if len(pairs) != len(chunk) or len(passed) != len(chunk):
                    raise RuntimeError("the judge must return one pair and verdict per candidate")
            for pair, ok in zip(pairs, passed, strict=True):
                if ok and (keep is None or len(kept) < keep):
                    kept.append(pair)
                    generated.append(pair)
                elif keep is None:
                    generated.append(pair)
                else:
                    generated.append(replace(pair, input_image=b"", edited_image=b""))
            if keep is not None and len(kept) >= keep:
                break
        return RowCandidates(kept=kept, generated=generated, batches=batches)

    @property
    def denoising_steps(self) -> int:
        """UNet evaluations per image at the config's steps."""
        return self.count_denoising_steps()

    def count_denoising_steps(
        self, num_inference_steps: int | None = None, scheduler: str | None = None
    ) -> int:
        """UNet evaluations per image (PNDM takes one more than num_inference_steps)."""
        instance = self._new_scheduler(scheduler)
        instance.set_timesteps(num_inference_steps or self.config.num_inference_steps)
        return len(instance.timesteps)

    def _new_scheduler(self, name: str | None = None):
        """A fresh scheduler: ``name``'s (see ``scheduler_class_and_options``) on the
        model's noise schedule, or the loaded pipeline's own."""
        base = self._require_pipe().scheduler
        if name is None:
            return type(base).from_config(base.config)
        scheduler_class, options = scheduler_class_and_options(name)
        return scheduler_class.from_config(base.config, **options)

    def _token_map(self, row: EditRow, cross_steps: Sequence[int]):
        if self.config.cross_attention_layers is None or not any(cross_steps):
            return None
        tokenizer = self.pipe.tokenizer

        def ids(text: str) -> list[int]:
            return tokenizer(
                text,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
            ).input_ids

        return shared_token_map(
            ids(row.input_caption), ids(row.output_caption), tokenizer.eos_token_id
        )

    def denoise(
        self,
        row: EditRow,
        params: Sequence[PairParams],
        on_step: StepCallback | None = None,
        *,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        negative_prompt: str | None = None,
        cross_attention_fraction: float | None = None,
    ) -> torch.Tensor:
        """Latents of ``params``' pairs, all in one UNet batch, shape (pairs, 2 =
        input/output, C, h, w)."""
        render = self._render(
            num_inference_steps,
            height,
            width,
            scheduler,
            negative_prompt,
            cross_attention_fraction,
            max(1, len(params)),
        )
        return self._denoise(row, params, render, on_step)

    @torch.inference_mode()
    def _denoise(
        self,
        row: EditRow,
        params: Sequence[PairParams],
        render: _Render,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        pipe = self._require_pipe()
        if not params:
            raise ValueError("no pair parameters given")
        device = pipe.device
        pairs = len(params)
        height, width = render.height, render.width

        # Text: [input caption, output caption] and their unconditional embeddings, laid out
        # as the controller expects: [uncond (in, out) x P, text (in, out) x P].
        text, uncond = pipe.encode_prompt(
            [row.input_caption, row.output_caption],
            device,
            1,
            True,
            negative_prompt=[render.negative_prompt] * 2 if render.negative_prompt else None,
        )
        embeddings = torch.cat([uncond.repeat(pairs, 1, 1), text.repeat(pairs, 1, 1)])

        # Per branch: a scheduler and a CPU generator seeded with the pair seed, so both
        # branches start from the same noise and the noise is the same on any device.
        from diffusers.utils.torch_utils import randn_tensor

        shape = (
            1,
            pipe.unet.config.in_channels,
            height // pipe.vae_scale_factor,
            width // pipe.vae_scale_factor,
        )
        schedulers, generators, latents = [], [], []
        for pair_params in params:
            for _branch in range(2):
                scheduler = self._new_scheduler(render.scheduler)
                scheduler.set_timesteps(render.num_inference_steps, device=device)
                generator = torch.Generator(device="cpu").manual_seed(pair_params.seed)
                noise = randn_tensor(shape, generator=generator, device=device, dtype=text.dtype)
                schedulers.append(scheduler)
                generators.append(generator)
                latents.append(noise * scheduler.init_noise_sigma)
        branch_step_kwargs = [
            step_kwargs(scheduler, generator)
            for scheduler, generator in zip(schedulers, generators, strict=True)
        ]

        timesteps = schedulers[0].timesteps
        steps = len(timesteps)
        injected = [injected_step_count(pair_params.p, steps) for pair_params in params]
        cross = [self._cross_steps(render, pair_params.p, steps) for pair_params in params]
        guidance = [pair_params.text_guidance for pair_params in params]
        with self.controller.session(
            injected,
            device=device,
            token_map=self._token_map(row, cross),
            cross_injected_steps=cross,
        ):
            for step, t in enumerate(timesteps):
                self.controller.set_step(step)
                scaled = torch.cat(
                    [s.scale_model_input(x, t) for s, x in zip(schedulers, latents, strict=True)]
                )
                noise_pred = pipe.unet(
                    torch.cat([scaled, scaled]),
                    t,
                    encoder_hidden_states=embeddings,
                    return_dict=False,
                )[0]
                noise_uncond, noise_text = noise_pred.chunk(2)
                for row_index, scheduler in enumerate(schedulers):
                    rows = slice(row_index, row_index + 1)
                    # StableDiffusionPipeline's guidance formula, term for term.
                    guided = noise_uncond[rows] + guidance[row_index // 2] * (
                        noise_text[rows] - noise_uncond[rows]
                    )
                    latents[row_index] = scheduler.step(
                        guided,
                        t,
                        latents[row_index],
                        **branch_step_kwargs[row_index],
                        return_dict=False,
                    )[0]
                if on_step is not None:
                    on_step(step + 1, steps)
        return torch.cat(latents).unflatten(0, (pairs, 2))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """PIL images of a batch of latents (N, C, h, w), decoded a few at a time (the
        VAE decoder's full-resolution activations dominate its memory)."""
        images: list[Image.Image] = []
        for start in range(0, latents.shape[0], DECODE_BATCH):
            images += self._decode(latents[start : start + DECODE_BATCH])
        return images

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        pipe = self._require_pipe()
        pixels = decode_latents(pipe.vae, latents / pipe.vae.config.scaling_factor)
        return pipe.image_processor.postprocess(pixels, output_type="pil")


# The process's loaded generator and the key it was loaded for (see get_pair_generator).
_loaded: tuple[tuple, PairGenerator] | None = None


def get_pair_generator(config: PairGeneratorConfig) -> PairGenerator:
    """The process-wide generator for ``config``'s model on its device and dtype (and its
    scheduler, layers and other fixed options), set up on first use.

    Steps and image size are not part of what is loaded: the returned generator has the
    defaults' steps and native size, and callers pass theirs per call (``generate_row(...,
    num_inference_steps=, height=, width=)``), so runs that differ only in those share one
    pipeline. Only one generator is kept: asking for another model releases the loaded one
    first, so a worker never holds two UNets.
    """
    global _loaded
    device = resolve_device(config.device)
    shared = replace(
        config,
        device=str(device),
        num_inference_steps=DEFAULT_STEPS,
        height=None,
        width=None,
    )
    key = (shared, str(serving_dtype(device)))
    if _loaded is not None and _loaded[0] == key:
        return _loaded[1]
    if _loaded is not None:
        log.info("releasing pair generator %s for %s", _loaded[1].info, shared.model)
        _loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    generator = PairGenerator(shared)
    generator.setup()
    _loaded = (key, generator)
    return generator
