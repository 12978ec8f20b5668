"""Resumable checkpoints of a fine-tuning run: DEST/checkpoints/step-N.

A checkpoint holds everything that decides the rest of the run: the trainable weights
(the LoRA layers, or the whole UNet; the text encoder's when it trains), the optimizer and
LR scheduler, the EMA weights, the random states (python, numpy, torch, CUDA and the
trainer's own generator) and the data iterator's position, per data-parallel rank, the
step, and the run's config, base model and dataset. It is written into a temporary
directory and renamed into place, so a run killed while saving leaves the previous
checkpoint whole; the newest `keep` are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CHECKPOINTS",
    "checkpoint_dirs",
    "latest_checkpoint",
    "load_rng_state",
    "prune_checkpoints",
    "read_state",
    "rng_state",
]

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
TEMP_PREFIX = ".tmp-step-"
STATE = "state.json"
WEIGHTS = "weights.safetensors"
TRAINING = "training.pt"


def checkpoint_dirs(dest: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under dest, oldest first."""
    root = Path(dest) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(PREFIX) and (path / STATE).is_file():
            try:
                found.append((int(path.name[len(PREFIX) :]), path))
            except ValueError:
                continue
    return sorted(found)


def latest_checkpoint(dest: Path) -> Path | None:
    dirs = checkpoint_dirs(dest)
    return dirs[-1][1] if dirs else None


def temp_dir(dest: Path, step: int) -> Path:
    path = Path(dest) / CHECKPOINTS / f"{TEMP_PREFIX}{step}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def commit(temp: Path, dest: Path, step: int) -> Path:
    """Rename a finished temporary checkpoint into place (atomic on one file system)."""
    final = Path(dest) / CHECKPOINTS / f"{PREFIX}{step}"
    if final.exists():
        # The same step saved again (a run stopped right after a periodic checkpoint).
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        temp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temp.rename(final)
    return final


def prune_checkpoints(dest: Path, keep: int) -> None:
    dirs = checkpoint_dirs(dest)
    for _, path in dirs[: max(0, len(dirs) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
    root = Path(dest) / CHECKPOINTS
    if root.is_dir():  # temporaries of runs killed while saving
        for path in root.glob(f"{TEMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def write_weights(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(
        {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()},
        str(directory / WEIGHTS),
    )


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / WEIGHTS))


def write_state(directory: Path, state: dict[str, Any]) -> None:
    (directory / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))


def read_state(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / STATE).read_text())


def write_training(directory: Path, training: dict[str, Any]) -> None:
    torch.save(training, directory / TRAINING)


def read_training(directory: Path) -> dict[str, Any]:
    # Our own file: optimizer state holds plain tensors and numbers, RNG states numpy's tuple.
    return torch.load(directory / TRAINING, map_location="cpu", weights_only=False)


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank}.pt"


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
