"""Copying a fine-tune's directories to and from the service's storage (file or S3).

Checkpoints go up as they are written so that a fine-tune resumes on any worker; a
checkpoint's `state.json` is uploaded last, as the trainer writes it last, so a checkpoint
that was cut off half-way up is never taken for a whole one.
"""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path

from services.common.storage import Storage
from services.gpu_worker.finetune.checkpoint import PREFIX, STATE

_STEP = re.compile(rf"^{re.escape(PREFIX)}(\d+)$")


def upload_dir(storage: Storage, local: Path, prefix: str, last: str | None = None) -> list[str]:
    """Put every file under ``local`` at ``prefix/<relative path>``; the file named
    ``last`` (relative to ``local``), if any, after the others. Returns the keys."""
    local = Path(local)
    prefix = prefix.strip("/")
    files = sorted(p for p in local.rglob("*") if p.is_file())
    if last is not None:
        files.sort(key=lambda p: p.relative_to(local).as_posix() == last)
    keys = []
    for path in files:
        key = f"{prefix}/{path.relative_to(local).as_posix()}"
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        storage.put(key, path.read_bytes(), content_type)
        keys.append(key)
    return keys


def download_prefix(storage: Storage, prefix: str, local: Path) -> list[Path]:
    """Get every object under ``prefix/`` into ``local`` (same relative paths)."""
    prefix = prefix.strip("/") + "/"
    written = []
    for key in storage.list(prefix):
        relative = key[len(prefix) :]
        if not relative or ".." in Path(relative).parts:
            continue
        target = Path(local) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.get(key))
        written.append(target)
    return written


def stored_checkpoints(storage: Storage, prefix: str) -> list[int]:
    """The steps of the complete checkpoints under ``prefix/`` (``step-N/state.json``
    present), oldest first."""
    prefix = prefix.strip("/") + "/"
    steps = set()
    for key in storage.list(prefix):
        parts = key[len(prefix) :].split("/")
        if len(parts) == 2 and parts[1] == STATE and (match := _STEP.match(parts[0])):
            steps.add(int(match.group(1)))
    return sorted(steps)


def upload_checkpoint(storage: Storage, directory: Path, prefix: str) -> str:
    """Upload checkpoint ``directory`` (``.../step-N``) to ``prefix/step-N/``, its state
    last, then delete the older checkpoints under ``prefix/``. Returns its key prefix."""
    directory = Path(directory)
    target = f"{prefix.strip('/')}/{directory.name}"
    upload_dir(storage, directory, target, last=STATE)
    step = int(_STEP.match(directory.name).group(1))
    for older in stored_checkpoints(storage, prefix):
        if older < step:
            storage.delete_prefix(f"{prefix.strip('/')}/{PREFIX}{older}/")
    return target


def download_latest_checkpoint(storage: Storage, prefix: str, dest: Path) -> int | None:
    """Download the newest complete stored checkpoint into ``dest/checkpoints/step-N``;
    its step, or None when there is none."""
    steps = stored_checkpoints(storage, prefix)
    if not steps:
        return None
    step = steps[-1]
    name = f"{PREFIX}{step}"
    download_prefix(storage, f"{prefix.strip('/')}/{name}", Path(dest) / "checkpoints" / name)
    return step
