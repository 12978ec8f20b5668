"""Every parameter of an edit job, declared once.

`EditParams` is the single declaration of each parameter's type, bounds, default and
description. Everything else derives from it: the POST /v1/edits form fields (FastAPI
reads the model as the form), the OpenAPI schema and /docs, validation with its 422
codes, the job record, the worker (which reads the params off the record) and the
README's parameter table (tests/common/test_edit_params.py checks it against
`markdown_rows()`; `python -m services.common.edit_params` prints them).

Adding a parameter: a field here (and, if jobs may only share a UNet batch when it is
equal, its name in BATCH_FIELDS), what the engine does with it, and its README row.
"""

from __future__ import annotations

import re
import secrets
from enum import StrEnum

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from services.common.adapters import ADAPTER_ID_MAX_LENGTH, ADAPTER_ID_PATTERN
from services.common.schedulers import MAX_STEPS, Scheduler
from services.common.webhooks import WEBHOOK_URL_MAX_LENGTH, WebhookEvent, WebhookSpec

SEED_MAX = 2**32 - 1


class OutputSize(StrEnum):
    input = "input"  # the uploaded photo's width and height
    model = "model"  # the resolution bucket the model ran at


class OutputFormat(StrEnum):
    png = "png"
    jpeg = "jpeg"
    webp = "webp"


class EditParams(BaseModel):
    prompt: str = Field(min_length=1, max_length=500, description="the edit instruction")
    negative_prompt: str | None = Field(None, max_length=500, description="what to steer away from")
    num_inference_steps: int = Field(20, ge=1, le=100, description="denoising steps")
    guidance_scale: float = Field(
        7.5, ge=0.0, le=30.0, description="text guidance S_T: how closely to follow the prompt"
    )
    image_guidance_scale: float = Field(
        1.5, ge=0.0, le=10.0, description="image guidance S_I: how closely to keep the photo"
    )
    seed: int = Field(
        default_factory=lambda: secrets.randbelow(SEED_MAX + 1),
        ge=0,
        le=SEED_MAX,
        description="random when absent; the seed used is always reported in `params`",
    )
    num_outputs: int = Field(1, ge=1, le=4, description="variations of the edit")
    scheduler: Scheduler = Field(
        Scheduler.euler_ancestral,
        description="the denoising sampler (`euler_ancestral` is InstructPix2Pix's own)",
    )
    adapter: str | None = Field(
        None,
        max_length=ADAPTER_ID_MAX_LENGTH,
        pattern=ADAPTER_ID_PATTERN,
        description="a LoRA adapter id from a fine-tune or `adapters register`; none: the "
        "base model",
    )
    output_size: OutputSize = Field(
        OutputSize.input,
        description="`input`: the photo's own width and height, with its fine detail kept "
        "where the edit did not change it; `model`: the resolution bucket the model ran at",
    )
    output_format: OutputFormat = Field(OutputFormat.png, description="image format of the outputs")
    output_quality: int = Field(
        90, ge=1, le=100, description="quality of `jpeg` and `webp` outputs"
    )
    mask_invert: bool = Field(
        False, description="invert the `mask` upload: its white area is kept, the rest may change"
    )
    mask_feather: int = Field(
        8,
        ge=0,
        le=64,
        description="width of the soft edge around the mask, in output pixels; beyond it, "
        "kept pixels are exactly the input's",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _plain_numbers(cls, value: object, info: ValidationInfo) -> object:
        # Form fields arrive as text, and pydantic's lax parsing would read "2_0" as 20
        # and " 20 " as 20: a number field takes plain decimal text only.
        if isinstance(value, str) and info.field_name in _NUMBER_FIELDS:
            pattern = _PLAIN_INT if _NUMBER_FIELDS[info.field_name] is int else _PLAIN_FLOAT
            if not pattern.fullmatch(value):
                raise ValueError(f"{value!r} is not a plain decimal number")
        return value

    @field_validator("prompt", "negative_prompt", mode="before")
    @classmethod
    def _strip(cls, value: object) -> object:
        # Whitespace around an instruction is noise; a blank negative prompt is none.
        if isinstance(value, str):
            value = value.strip()
        return value

    @field_validator("adapter", mode="before")
    @classmethod
    def _no_adapter(cls, value: object) -> object:
        # An empty form field names no adapter.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("scheduler")
    @classmethod
    def _steps_within_the_schedulers_limit(
        cls, scheduler: Scheduler, info: ValidationInfo
    ) -> Scheduler:
        steps, limit = info.data.get("num_inference_steps"), MAX_STEPS.get(scheduler)
        if steps is not None and limit is not None and steps > limit:
            raise ValueError(f"{scheduler} takes at most {limit} steps, not {steps}")
        return scheduler


_PLAIN_INT = re.compile(r"[+-]?[0-9]+")
_PLAIN_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# The number fields and their types (for the strict parsing of form text above).
_NUMBER_FIELDS = {
    name: field.annotation
    for name, field in EditParams.model_fields.items()
    if field.annotation in (int, float)
}

# Parameters that shape the shared denoising loop: jobs may run in one UNet batch only when
# these are equal (and their model input size and guidance mode, see batch_key). The
# adapter is the UNet's (and maybe the text encoder's) weights: one per batch.
BATCH_FIELDS = ("num_inference_steps", "scheduler", "adapter")


def uses_guidance(params: EditParams) -> bool:
    """Whether the job runs InstructPix2Pix's three guidance branches (prompt and image,
    image alone, neither). The paper's formula means something for every (S_T, S_I),
    lowering either scale below 1 included, so it runs unless both are exactly 1, where it
    reduces to the first branch alone. (diffusers' pipeline drops all guidance when
    S_T <= 1 or S_I < 1, which made (7.5, 0.99) and (1, 5) the same edit as (1, 1).)"""
    return params.guidance_scale != 1.0 or params.image_guidance_scale != 1.0


def batch_key(size: tuple[int, int], params: EditParams) -> str:
    """Jobs with equal keys can share one UNet call per step: same latent shape, same
    timesteps, same branch layout. Prompts, seeds, scales and output counts may differ."""
    mode = "cfg" if uses_guidance(params) else "text"
    # A field that is unset (no adapter) adds nothing: base-model keys read as they did.
    values = (getattr(params, name) for name in BATCH_FIELDS)
    shared = (str(value) for value in values if value is not None)
    return ":".join([f"{size[0]}x{size[1]}", *shared, mode])


# -- the submission form -------------------------------------------------------------------

_EVENT_NAMES = "|".join(event.value for event in WebhookEvent)


class EditForm(EditParams):
    """The submission form: the edit's parameters, and where to deliver its events."""

    webhook_url: str | None = Field(
        None,
        max_length=WEBHOOK_URL_MAX_LENGTH,
        description="where to deliver the job's events (Standard Webhooks, signed with the "
        "key's webhook secret): an http(s) URL of a public host",
    )
    webhook_events: str = Field(
        "completed",
        pattern=rf"^\s*({_EVENT_NAMES})(\s*,\s*({_EVENT_NAMES}))*\s*$",
        description="which events to deliver, comma-separated: `start`, `progress`, "
        "`completed` (the job ended: succeeded, failed or canceled)",
    )

    def split(self) -> tuple[EditParams, WebhookSpec | None]:
        params = EditParams.model_validate(
            self.model_dump(exclude={"webhook_url", "webhook_events"})
        )
        if self.webhook_url is None:
            return params, None
        names = dict.fromkeys(name.strip() for name in self.webhook_events.split(","))
        return params, WebhookSpec(url=self.webhook_url, events=list(names))


# -- the README's parameter table ----------------------------------------------------------


def markdown_rows() -> list[str]:
    """One README table row per form field: name, default, description and bounds."""
    rows = []
    for name, field in EditForm.model_fields.items():
        rows.append(f"| `{name}` | {_default(field)} | {_meaning(field)} |")
    return rows


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return "random"
    if field.default is None:
        return "none"
    if isinstance(field.default, bool):
        return str(field.default).lower()  # as a form field says it
    return str(getattr(field.default, "value", field.default))


def _meaning(field) -> str:
    bounds = _bounds(field)
    return f"{field.description}, {bounds}" if bounds else field.description


# Ranges read "1\u2013100", with an en dash, as in the README.
_TO = "\u2013"


def _bounds(field) -> str:
    choices = getattr(field.annotation, "__members__", None)
    if choices:
        return "one of " + ", ".join(f"`{choice}`" for choice in choices.values())
    limits: dict[str, object] = {}
    for item in field.metadata:
        for name in ("ge", "le", "min_length", "max_length"):
            value = getattr(item, name, None)
            if value is not None:
                limits[name] = value
    if "min_length" in limits:
        return f"{limits['min_length']}{_TO}{limits['max_length']} characters"
    if "max_length" in limits:
        return f"at most {limits['max_length']} characters"
    if "ge" in limits and "le" in limits:
        high = "2^32-1" if limits["le"] == SEED_MAX else f"{limits['le']:g}"
        return f"{limits['ge']:g}{_TO}{high}"
    return ""


if __name__ == "__main__":
    print("\n".join(markdown_rows()))
