"""Copying a fine-tune's directories to and from the service's storage (file or S3).

Checkpoints go up as they are written so that a fine-tune resumes on any worker; a
checkpoint's `state.json` is uploaded last, as the trainer writes it last, so a checkpoint
that was cut off half-way up is never taken for a whole one. `OutputSync` is what the
worker task and the CLI (`run_finetune_to_storage`, for `--out s3://...`) both call after
every step to upload what is new.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from services.common.storage import Storage
from services.gpu_worker.finetune.checkpoint import CHECKPOINTS, PREFIX, STATE, latest_checkpoint

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"

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


def latest_validation(local: Path) -> tuple[int, Path] | None:
    """(step, directory) of the newest ``local/validation/step-N``, or None."""
    root = Path(local) / "validation"
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        name = path.name
        if path.is_dir() and name.startswith("step-") and name[5:].isdigit():
            found.append((int(name[5:]), path))
    return max(found) if found else None


class OutputSync:
    """Uploads what a running fine-tune writes under ``local``: each new checkpoint (to
    ``checkpoints/step-N``, the older stored one deleted) and the newest validation renders
    (to ``validation/step-N``). Call it after every step (from ``should_stop``) and once at
    the end; it uploads only what is new since the last call.

    checkpoint_step: the step of the checkpoint already stored (what the run resumed from).
    files: names of files under ``local`` (``metrics.jsonl``) uploaded beside each new
        checkpoint, to ``files_prefix/<name>``.
    on_validation: called with (step, keys of the uploaded PNGs) after renders go up.
    """

    def __init__(
        self,
        storage: Storage,
        local: Path,
        checkpoints: str,
        validation: str,
        *,
        checkpoint_step: int | None = None,
        files: tuple[str, ...] = (),
        files_prefix: str = "",
        on_validation: Callable[[int, list[str]], None] | None = None,
    ) -> None:
        self.storage = storage
        self.local = Path(local)
        self.checkpoints = checkpoints
        self.validation = validation
        self.checkpoint_step = checkpoint_step
        self.validation_step: int | None = None
        self.files = files
        self.files_prefix = files_prefix.strip("/")
        self.on_validation = on_validation

    def __call__(self) -> None:
        checkpoint = latest_checkpoint(self.local)
        if checkpoint is not None:
            step = int(_STEP.match(checkpoint.name).group(1))
            if self.checkpoint_step is None or step > self.checkpoint_step:
                upload_checkpoint(self.storage, checkpoint, self.checkpoints)
                self.checkpoint_step = step
                self.upload_files(*self.files)
        validation = latest_validation(self.local)
        if validation is not None and validation[0] != self.validation_step:
            step, directory = validation
            keys = upload_dir(self.storage, directory, f"{self.validation.strip('/')}/step-{step}")
            self.validation_step = step
            if self.on_validation is not None:
                self.on_validation(step, [k for k in keys if k.endswith(".png")])

    def upload_files(self, *names: str) -> list[str]:
        """Upload the named files of ``local`` that exist to ``files_prefix/<name>``."""
        keys = []
        for name in names:
            path = self.local / name
            if path.is_file():
                key = f"{self.files_prefix}/{name}" if self.files_prefix else name
                content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
                self.storage.put(key, path.read_bytes(), content_type)
                keys.append(key)
        return keys


def open_storage_url(url: str, settings=None) -> Storage:
    """The storage at ``url`` (``file://<dir>`` or ``s3://bucket/prefix``); ``settings``
    gives the S3 endpoint and region, else the environment's ``Settings``."""
    from services.common.settings import Settings
    from services.common.storage import open_storage

    if settings is None:
        settings = Settings(storage_url=url)
    else:
        settings = settings.model_copy(update={"storage_url": url})
    return open_storage(settings)


def is_storage_url(dest: str | Path) -> bool:
    return str(dest).startswith(("file://", "s3://"))


def default_work_dir(url: str) -> Path:
    """The local directory a run into storage URL ``url`` trains in: the same one for the
    same URL, so a run started again on this machine finds what it left."""
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "instructedit-finetune" / digest


def run_finetune_to_storage(
    config,
    dataset_source: str,
    base: str,
    dest_url: str,
    *,
    work_dir: str | Path | None = None,
    storage: Storage | None = None,
    on_progress=None,
    should_stop: Callable[[], bool] | None = None,
    metrics=None,
):
    """`run_finetune` into storage URL ``dest_url``: trains in ``work_dir`` (default
    `default_work_dir`) after downloading the newest checkpoint stored under
    ``DEST/checkpoints/``, uploads each new checkpoint (with ``metrics.jsonl``) and the
    newest validation renders as they are written, and at the end the ``adapter/`` or
    ``pipeline/``, ``metrics.jsonl`` and ``finetune.json``. Started again with the same
    ``dest_url`` (on any machine), it resumes from the stored checkpoint."""
    import os

    from services.gpu_worker.finetune.train import FinetuneError, run_finetune

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FinetuneError(
            "a storage URL --out is for one process; under accelerate launch give a local "
            "directory and copy it to storage afterwards"
        )
    if storage is None:
        try:
            storage = open_storage_url(dest_url)
        except ValueError as exc:
            raise FinetuneError(str(exc)) from exc
    work = Path(work_dir) if work_dir is not None else default_work_dir(dest_url)
    work.mkdir(parents=True, exist_ok=True)
    resumed = download_latest_checkpoint(storage, CHECKPOINTS, work)
    if resumed is not None:
        log.info("downloaded the checkpoint of step %d from %s", resumed, dest_url)
        _download_metrics(storage, work, resumed)
    sync = OutputSync(
        storage,
        work,
        CHECKPOINTS,
        "validation",
        checkpoint_step=resumed,
        files=(METRICS,),
    )

    def stop_after_sync() -> bool:
        sync()
        return should_stop() if should_stop is not None else False

    result = run_finetune(
        config,
        dataset_source,
        base,
        work,
        on_progress=on_progress,
        should_stop=stop_after_sync,
        metrics=metrics,
    )
    sync()
    if not result.stopped:
        for name, directory in (("adapter", result.adapter_dir), ("pipeline", result.pipeline_dir)):
            if directory is not None:
                storage.delete_prefix(f"{name}/")
                upload_dir(storage, directory, name)
        sync.upload_files(METRICS, "finetune.json")
    log.info("fine-tune outputs are in %s (worked in %s)", dest_url, work)
    return result


def _download_metrics(storage: Storage, work: Path, step: int) -> None:
    """A work directory without metrics.jsonl gets the stored one, up to ``step``."""
    local = work / METRICS
    if local.exists() or not storage.exists(METRICS):
        return
    lines = storage.get(METRICS).decode().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    local.write_text("".join(line + "\n" for line in kept))
