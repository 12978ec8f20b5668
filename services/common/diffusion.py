"""What every torch service shares about diffusers pipelines: which device and dtype run
them, where a pipeline comes from (a local directory or the Hub) and how it loads, with
errors that say what to do, and the fp16-safe VAE decode.

Used by the edit workers (services/gpu_worker) and the datagen workers alike; the API
never imports this module (it imports torch).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import logging
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """The model cannot be found or loaded; the message says what to do."""


# -- device and dtype ---------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when there is one, else the CPU; `cuda[:N]` without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but no CUDA device is available")
    return resolved


def serving_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPUs halves memory and doubles tensor-core throughput; CPUs have no fast fp16."""
    return torch.float16 if device.type == "cuda" else torch.float32


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# -- where a pipeline comes from ----------------------------------------------------------


def local_pipeline_dir(model: str, hint: str) -> Path | None:
    """The directory `model` names, checked to hold a diffusers pipeline; None for a Hub id."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelUnavailable(
                f"model directory {path} has no model_index.json; it is not a diffusers "
                f"pipeline. {hint}"
            )
        return path.resolve()
    if model.startswith((".", "/", "~")):
        raise ModelUnavailable(f"model directory {model} does not exist. {hint}")
    return None


def resolve_pipeline_dir(model: str, hint: str) -> Path:
    """A local directory holding `model`, downloading it into the Hugging Face cache first
    when it is a Hub id. Workers call this in their parent process, before any child
    touches CUDA, so a missing model stops the worker at start instead of failing jobs."""
    local = local_pipeline_dir(model, hint)
    if local is not None:
        return local
    from diffusers import DiffusionPipeline

    try:
        # download() fetches only what from_pretrained would load (no .ckpt, no EMA copies),
        # for whichever pipeline class the repository's model_index.json names.
        return Path(DiffusionPipeline.download(model))
    except Exception as exc:
        raise ModelUnavailable(
            f"the model {model!r} could not be downloaded from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). {hint}"
        ) from exc


def pipeline_class_name(directory: str | Path) -> str:
    """The diffusers pipeline class a pipeline directory declares (model_index.json)."""
    index = Path(directory) / "model_index.json"
    try:
        return json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelUnavailable(f"{index} does not name a pipeline class: {exc}") from exc


def load_pipeline(pipeline_class: type, model: str, dtype: torch.dtype, hint: str, **kwargs):
    """`pipeline_class.from_pretrained` of a local directory or a Hub id (downloaded into the
    Hugging Face cache once), with an error that says what to do when it cannot load.
    `kwargs` go to the pipeline (e.g. `safety_checker=None`)."""
    local = local_pipeline_dir(model, hint)
    source = str(local) if local is not None else model
    try:
        return pipeline_class.from_pretrained(source, dtype=dtype, **kwargs)
    except Exception as exc:
        raise ModelUnavailable(
            f"the model {model!r} could not be loaded as a {pipeline_class.__name__} "
            f"({type(exc).__name__}: {exc}). {hint}"
        ) from exc


# -- stepping a scheduler ----------------------------------------------------------------


def step_kwargs(scheduler, generator) -> dict:
    """What the stock pipelines' `prepare_extra_step_kwargs` passes to `scheduler.step`
    (eta 0, the generator), asked of this scheduler: the pipelines' own version asks the
    pipeline's scheduler, which need not be the one being stepped. `generator` may be a
    NoiseSource for a step function of `noise_injecting_step`."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def start_at_first_step(scheduler) -> None:
    """Tell a scheduler that denoising starts at its first timestep, where it supports
    that (`set_begin_index`, diffusers' own call for it): its step index is then a plain
    Python counter from the first step on, instead of a search of the timesteps for the
    current one (`index_for_timestep`: `.nonzero()` and `.item()`, a host-device sync on a
    GPU). DDIM keeps no step index and needs none."""
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)


class NoiseSource:
    """Stands in for the `generator` of a scheduler's step: the noise a stochastic sampler
    (Euler ancestral, LCM) draws inside `step` comes from here, drawn up front, instead of
    from a generator there and then.

    That is how a whole batch takes one scheduler step while each job's noise is still its
    own generator's (drawn in the job's own order and shapes, so a job alone gets exactly
    the stock pipeline's noise), and how the step draws nothing on the host and copies
    nothing to the device. `draws` are the step's successive draws, each already in its
    place on the device; a draw of another shape than planned is a bug and raises.
    """

    def __init__(self, draws: torch.Tensor | list[torch.Tensor]) -> None:
        self.draws = draws
        self.taken = 0

    def next(self, shape: tuple[int, ...], dtype: torch.dtype | None) -> torch.Tensor:
        if self.taken >= len(self.draws):
            raise RuntimeError(f"the sampler drew noise {self.taken + 1} times; planned for fewer")
        draw = self.draws[self.taken]
        if tuple(draw.shape) != tuple(shape) or (dtype is not None and draw.dtype != dtype):
            raise RuntimeError(
                f"the sampler drew noise of {tuple(shape)} {dtype}; planned "
                f"{tuple(draw.shape)} {draw.dtype}"
            )
        self.taken += 1
        return draw


class _DrawRecorder(NoiseSource):
    """A NoiseSource that hands out zeros and records which draws a sampler makes."""

    def __init__(self) -> None:
        super().__init__([])
        self.step = 0
        self.made: list[tuple[int, torch.dtype]] = []

    def next(self, shape: tuple[int, ...], dtype: torch.dtype | None) -> torch.Tensor:
        self.made.append((self.step, dtype))
        return torch.zeros(shape, dtype=dtype)


def _randn_or_source(shape, generator=None, device=None, dtype=None, layout=None):
    """diffusers' `randn_tensor`, except that a NoiseSource as the generator gives its
    next draw."""
    if isinstance(generator, NoiseSource):
        return generator.next(tuple(shape), dtype)
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=device, dtype=dtype, layout=layout)


@functools.cache
def noise_injecting_step(scheduler_class: type) -> Callable:
    """`scheduler_class.step` as a plain function (call it with the scheduler first) that
    takes a NoiseSource as its `generator`.

    diffusers' samplers draw their noise inside `step` with `randn_tensor(...,
    generator=generator)`, and Euler ancestral and LCM take no noise argument. This is
    the very same function (its code object, so the arithmetic is the stock one to the
    bit), with the name `randn_tensor` in its globals bound to a function that serves a
    NoiseSource's draws and hands any real generator to diffusers' own. Nothing in
    diffusers is patched. A step whose code draws no noise is returned as it is.
    """
    step = scheduler_class.step
    if "randn_tensor" not in step.__code__.co_names:
        return step
    namespace = dict(vars(sys.modules[step.__module__]))
    namespace["randn_tensor"] = _randn_or_source
    injecting = types.FunctionType(
        step.__code__, namespace, step.__name__, step.__defaults__, step.__closure__
    )
    injecting.__kwdefaults__ = step.__kwdefaults__
    injecting.__qualname__ = step.__qualname__
    return injecting


def noise_draws(scheduler, num_inference_steps: int, dtype: torch.dtype) -> list:
    """Which of its steps a sampler draws noise in, and of which dtype, for a model
    output of `dtype`: [(step index, dtype), ...] in the order it draws them (Euler
    ancestral: every step; LCM: every step but the last; Euler, DPM++ 2M, UniPC and DDIM
    with eta 0: none). Found by running a copy of the sampler on a tiny zero sample, so
    that it holds for any sampler and configuration without a list to keep up to date."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    start_at_first_step(scheduler)
    step = noise_injecting_step(type(scheduler))
    recorder = _DrawRecorder()
    kwargs = step_kwargs(scheduler, recorder)
    sample = torch.zeros((1, 4, 8, 8), dtype=dtype)
    for index, t in enumerate(scheduler.timesteps):
        recorder.step = index
        scaled = scheduler.scale_model_input(sample, t)
        output = torch.zeros_like(scaled)
        sample = step(scheduler, output, t, sample, **kwargs, return_dict=False)[0]
    return recorder.made


# -- the fp16-safe VAE ----------------------------------------------------------------------


@contextlib.contextmanager
def vae_in_float32(vae) -> Iterator[None]:
    """Run the VAE in float32 inside the block and put it back in its serving dtype after,
    also after a failure (float32 needs twice the memory): a VAE left in float32 would
    break every later fp16 encode and decode."""
    serving = vae.dtype
    vae.to(torch.float32)
    try:
        yield
    finally:
        vae.to(serving)


@torch.inference_mode()
def decode_latents(vae, latents: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """Pixels in [-1, 1] of already unscaled latents.

    The SD VAE decoder's activations can overflow fp16 into inf/NaN, which comes out as a
    black picture: a non-finite fp16 decode is redone in float32. `upcast` decodes in
    float32 from the start, for VAEs whose config says they always overflow in fp16
    (SDXL's `force_upcast`).
    """
    if not (upcast and vae.dtype == torch.float16):
        pixels = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        if torch.isfinite(pixels).all():
            return pixels
        log.warning("fp16 VAE decode overflowed; decoding again in float32")
    with vae_in_float32(vae):
        return vae.decode(latents.float(), return_dict=False)[0]


# -- pixels to pictures ---------------------------------------------------------------------


def to_uint8(pixels: torch.Tensor, image_processor) -> torch.Tensor:
    """The decoded pixels (N, 3, H, W in [-1, 1]) as 8-bit images (N, H, W, 3), computed
    where the pixels are, so that one copy of bytes leaves the device instead of floats.

    The same arithmetic as the stock pipelines' `image_processor.postprocess(..., "pil")`
    to the bit: denormalised in the pixels' dtype (`x * 0.5 + 0.5`, clamped to [0, 1]),
    then float32, times 255, rounded half to even (numpy's `round` and torch's agree) and
    cast, which the stock path does in numpy on the host."""
    if image_processor.config.do_normalize:
        pixels = image_processor.denormalize(pixels)
    return (pixels.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)


def pil_images(images: torch.Tensor) -> list:
    """PIL pictures of 8-bit images (N, H, W, 3) on any device: one copy to the host."""
    from PIL import Image

    return [Image.fromarray(image) for image in images.cpu().numpy()]
