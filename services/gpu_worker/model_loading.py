"""Finding and loading the InstructPix2Pix pipeline, from a local directory or the Hub."""

from __future__ import annotations

import logging
from pathlib import Path

from services.common.model_source import ModelUnavailable, local_pipeline_dir

log = logging.getLogger(__name__)

NO_MODEL_HINT = (
    "Set INSTRUCTEDIT_MODEL to a local copy of the pipeline (a directory with "
    "model_index.json), or run offline with the tiny model: `make run MODEL=tiny`."
)


def resolve_model(model: str) -> Path:
    """Return a local directory holding `model`, downloading it into the HF cache if needed.

    Runs in the worker's parent process, before any child touches CUDA, so a missing model
    stops the worker at start instead of failing every job.
    """
    local = local_pipeline_dir(model, NO_MODEL_HINT)
    if local is not None:
        return local

    from diffusers import StableDiffusionInstructPix2PixPipeline

    try:
        # download() fetches only what from_pretrained would load (no .ckpt, no EMA copies).
        return Path(StableDiffusionInstructPix2PixPipeline.download(model))
    except Exception as exc:
        raise ModelUnavailable(
            f"the model {model!r} could not be downloaded from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). {NO_MODEL_HINT}"
        ) from exc
