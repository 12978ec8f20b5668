"""What every torch service shares about diffusers pipelines: which device and dtype run
them, where a pipeline comes from (a local directory or the Hub) and how it loads, with
errors that say what to do, and the fp16-safe VAE decode.

Used by the edit workers (services/gpu_worker) and the datagen workers alike; the API
never imports this module (it imports torch).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import Iterator
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


def step_kwargs(scheduler, generator: torch.Generator) -> dict:
    """What the stock pipelines' `prepare_extra_step_kwargs` passes to `scheduler.step`
    (eta 0, the generator), asked of this scheduler: the pipelines' own version asks the
    pipeline's scheduler, which need not be the one being stepped."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


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
