"""InstructPix2Pix model families the engine serves, picked by the pipeline class a model
directory's model_index.json names."""

from __future__ import annotations

from pathlib import Path

from services.common.diffusion import ModelUnavailable, pipeline_class_name
from services.gpu_worker.families.base import ModelFamily, TextConditioning
from services.gpu_worker.families.hints import NO_MODEL_HINT
from services.gpu_worker.families.sd15 import StableDiffusionInstructPix2Pix
from services.gpu_worker.families.sdxl import StableDiffusionXLInstructPix2Pix

__all__ = [
    "FAMILIES",
    "NO_MODEL_HINT",
    "ModelFamily",
    "TextConditioning",
    "family_for_model",
    "family_for_pipeline",
]

FAMILIES: dict[str, type[ModelFamily]] = {
    family.pipeline_class_name: family
    for family in (StableDiffusionInstructPix2Pix, StableDiffusionXLInstructPix2Pix)
}


def _family_named(class_name: str, what: str) -> type[ModelFamily]:
    family = FAMILIES.get(class_name)
    if family is None:
        raise ModelUnavailable(
            f"{what} is a {class_name}; the edit workers serve {', '.join(sorted(FAMILIES))}. "
            f"{NO_MODEL_HINT}"
        )
    return family


def family_for_model(directory: str | Path) -> type[ModelFamily]:
    """The family of a local pipeline directory, from its model_index.json."""
    return _family_named(pipeline_class_name(directory), f"the model in {directory}")


def family_for_pipeline(pipe) -> type[ModelFamily]:
    """The family of an already built pipeline (benchmarks build them from configs)."""
    return _family_named(type(pipe).__name__, "the given pipeline")
