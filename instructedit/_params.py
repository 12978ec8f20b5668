"""Edit parameters, checked locally against the API's own declaration.

`services.common.edit_params.EditForm` declares every submit field once, with its bounds;
the SDK turns the caller's values into the form text it will send and validates that text
with the same model the API reads the form with, so a value the API would refuse with 422
``invalid_<field>`` is refused here, before anything is uploaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

from pydantic import ValidationError

from instructedit.errors import InvalidRequestError
from services.common.edit_params import EditForm, EditParams

# The keyword parameters of `edit()`: every EditParams field but the positional prompt.
PARAM_NAMES: tuple[str, ...] = tuple(name for name in EditParams.model_fields if name != "prompt")


def form_text(value: Any) -> str:
    """A value as a form field carries it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def edit_fields(
    prompt: str,
    params: Mapping[str, Any],
    webhook_url: str | None = None,
    webhook_events: Sequence[str] | None = None,
) -> dict[str, str]:
    """The form fields of a submission: only what the caller gave (the server draws the
    seed and applies its defaults), checked as the API checks them.

    Raises TypeError for a parameter that does not exist, InvalidRequestError (code
    ``invalid_<field>``, as the API's) for a value out of bounds.
    """
    unknown = [name for name in params if name not in PARAM_NAMES]
    if unknown:
        known = ", ".join(PARAM_NAMES)
        raise TypeError(
            f"edit() got an unexpected keyword argument {unknown[0]!r} (known: {known})"
        )
    fields = {"prompt": prompt if isinstance(prompt, str) else form_text(prompt)}
    fields.update({name: form_text(value) for name, value in params.items() if value is not None})
    if webhook_url is not None:
        fields["webhook_url"] = webhook_url
    if webhook_events is not None:
        if isinstance(webhook_events, str):
            webhook_events = [webhook_events]
        fields["webhook_events"] = ",".join(form_text(e) for e in webhook_events)
    try:
        EditForm.model_validate(fields)
    except ValidationError as exc:
        raise _invalid(exc) from None
    return fields


def _invalid(exc: ValidationError) -> InvalidRequestError:
    # As services/api/errors.py names them: one field, invalid_<field> / missing_<field>.
    errors = exc.errors()
    names = [str(e["loc"][-1]) if e.get("loc") else "" for e in errors]
    if len(set(names)) == 1 and names[0]:
        prefix = "missing" if errors[0].get("type") == "missing" else "invalid"
        code = f"{prefix}_{names[0]}"
    else:
        code = "invalid_request"
    message = "; ".join(
        f"{name}: {e.get('msg')}" if name else str(e.get("msg"))
        for name, e in zip(names, errors, strict=True)
    )
    return InvalidRequestError(422, code, message)
