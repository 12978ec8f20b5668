"""Where a diffusers pipeline comes from (a local directory or the Hub) and which device
runs it; shared by the edit workers and the datagen workers."""

from __future__ import annotations

from pathlib import Path

import torch


class ModelUnavailable(RuntimeError):
    """The model cannot be found or loaded; the message says what to do."""


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when there is one, else the CPU; `cuda[:N]` without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but no CUDA device is available")
    return resolved


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
