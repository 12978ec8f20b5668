"""`instructedit batch`: edit a catalog of photos, resumably.

The items come from a folder of images or a CSV/JSONL manifest. OUTDIR/STATE_NAME is an
append-only JSON-lines journal, each line fsync'd: a header with the batch's nonce, then per
item ``submitted`` (its job id, once the API accepted it), ``done`` (its output files) or
``failed`` (the reason). A run started again skips the items that are done, re-attaches to
the jobs it submitted but did not see finish, and submits the rest. Every submission
carries an Idempotency-Key derived from the batch's nonce, the item (its row and image
bytes) and its attempt number, so even a crash between the API accepting a job and the
journal recording it cannot submit the item twice: the API answers the retry with the job
the first submission made.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from instructedit import APIConnectionError, APIError, Client, InstructEditError, Job, NotFoundError

STATE_NAME = ".instructedit-batch.jsonl"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif"}
MANIFEST_SUFFIXES = {".csv", ".jsonl", ".ndjson"}
# The manifest columns that are edit parameters, with the type their text is read as.
PARAM_TYPES: dict[str, type] = {
    "negative_prompt": str,
    "num_inference_steps": int,
    "guidance_scale": float,
    "image_guidance_scale": float,
    "seed": int,
    "num_outputs": int,
    "scheduler": str,
    "output_size": str,
    "output_format": str,
    "output_quality": int,
    "mask_invert": bool,
    "mask_feather": int,
}
OTHER_COLUMNS = {"image", "instruction", "prompt", "mask", "id", "name"}
TRUE = {"1", "true", "yes", "y", "on"}
FALSE = {"0", "false", "no", "n", "off"}


class BatchError(Exception):
    """The input cannot be read as a batch (a usage error)."""


@dataclass
class Item:
    index: int
    key: str  # the item's identity in the journal: stable across runs of one input
    source: str  # a local path or an http(s) URL
    label: str  # how the item is shown
    instruction: str | None
    params: dict[str, Any]
    mask: str | None = None
    problem: str | None = None  # why the row cannot be submitted at all
    stem: str = ""
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def is_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))


def _convert(name: str, value: Any) -> Any:
    kind = PARAM_TYPES[name]
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE:
            return True
        if text in FALSE:
            return False
        raise ValueError(f"{name}: {value!r} is not true or false")
    if kind is str:
        return str(value).strip()
    if isinstance(value, bool):
        raise ValueError(f"{name}: {value!r} is not a number")
    try:
        if kind is int:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(str(value).strip())
        return float(str(value).strip())
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{name}: {value!r} is not {what}") from None


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or "image" not in [n.strip() for n in reader.fieldnames]:
                    raise BatchError(f"{path}: the CSV manifest needs an 'image' column")
                return [
                    {(k or "").strip(): v for k, v in row.items() if k is not None}
                    for row in reader
                ]
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BatchError(f"{path}:{number}: not JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise BatchError(f"{path}:{number}: a line must be a JSON object")
                rows.append(row)
        return rows
    except OSError as exc:
        raise BatchError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise BatchError(f"{path}: not UTF-8 text") from None


def _stem_of(source: str) -> str:
    path = urlparse(source).path if source.startswith(("http://", "https://")) else source
    return Path(path).stem or "image"


def load_items(source: Path, instruction: str | None, defaults: dict[str, Any]) -> list[Item]:
    """The batch's items from a folder of images or a manifest, with their output stems."""
    items: list[Item] = []
    if source.is_dir():
        files = sorted(
            p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        for index, path in enumerate(files):
            items.append(Item(index, path.name, str(path), path.name, instruction, dict(defaults)))
    elif source.suffix.lower() in MANIFEST_SUFFIXES:
        rows = _read_manifest(source)
        unknown = sorted(
            {k for row in rows for k in row if k not in PARAM_TYPES and k not in OTHER_COLUMNS}
        )
        if unknown:
            raise BatchError(
                f"{source}: unknown column(s) {', '.join(unknown)} (known: image, instruction, "
                f"mask, {', '.join(PARAM_TYPES)})"
            )
        for index, row in enumerate(rows):
            image = str(row.get("image") or "").strip()
            row_instruction = str(row.get("instruction") or row.get("prompt") or "").strip()
            params = dict(defaults)
            problem = None
            for name in PARAM_TYPES:
                if name in row:
                    try:
                        value = _convert(name, row[name])
                    except ValueError as exc:
                        problem = f"row {index + 1}: {exc}"
                        continue
                    if value is not None:
                        params[name] = value
            if not image:
                problem = f"row {index + 1}: no image"
            elif not image.startswith(("http://", "https://")):
                image_path = Path(image)
                image = str(image_path if image_path.is_absolute() else source.parent / image)
            mask = str(row.get("mask") or "").strip() or None
            if mask and not mask.startswith(("http://", "https://")):
                mask = str(Path(mask) if Path(mask).is_absolute() else source.parent / mask)
            label = f"row {index + 1} ({row.get('image') or '?'})"
            items.append(
                Item(
                    index,
                    f"row:{index}:{row.get('image')}",
                    image,
                    label,
                    row_instruction or instruction,
                    params,
                    mask,
                    problem,
                    row=row,
                )
            )
    else:
        raise BatchError(f"{source}: expected a folder of images or a .csv/.jsonl manifest")
    seen: set[str] = set()
    for item in items:
        stem = _stem_of(item.source)
        if stem.lower() in seen:
            stem = f"{stem}-{item.index}"
        seen.add(stem.lower())
        item.stem = stem
        if item.problem is None and not item.instruction:
            item.problem = "no instruction (give one on the command line or in the manifest)"
    return items


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class Journal:
    """The batch's state file: append-only JSON lines, each fsync'd before going on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.closed = False
        self.nonce: str | None = None
        self.records: dict[str, list[dict[str, Any]]] = {}
        if path.exists():
            self._load()
        self._file = path.open("a", encoding="utf-8")
        if path.stat().st_size and not _ends_with_newline(path):
            self._file.write("\n")  # after a line cut short by a crash
        if self.nonce is None:
            self.nonce = secrets.token_hex(16)
            self._write({"type": "batch", "version": 1, "nonce": self.nonce, "at": time.time()})

    def _load(self) -> None:
        with self.path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if not isinstance(record, dict):
                    continue
                if record.get("type") == "batch":
                    self.nonce = self.nonce or record.get("nonce")
                elif "key" in record:
                    self.records.setdefault(record["key"], []).append(record)

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def record(self, record: dict[str, Any]) -> None:
        with self.lock:
            if self.closed:
                return
            self._write({**record, "at": time.time()})
            self.records.setdefault(record["key"], []).append(record)

    def close(self) -> None:
        """No more records (taken under the lock, so no record is cut short)."""
        with self.lock:
            self.closed = True
            self._file.close()

    def done(self, key: str) -> dict[str, Any] | None:
        for record in reversed(self.records.get(key, [])):
            if record["type"] == "done":
                return record
        return None

    def pending_job(self, key: str) -> str | None:
        """The job submitted for the item's current attempt, not yet seen to finish."""
        records = self.records.get(key, [])
        if records and records[-1]["type"] == "submitted":
            return records[-1]["job_id"]
        return None

    def attempt(self, key: str) -> int:
        return sum(1 for r in self.records.get(key, []) if r["type"] == "failed")


@dataclass
class Outcome:
    item: Item
    status: str  # done, skipped, failed
    detail: str = ""
    job_id: str | None = None
    outputs: list[str] = field(default_factory=list)


def _read_source(location: str, what: str) -> bytes:
    if location.startswith(("http://", "https://")):
        try:
            response = httpx.get(location, follow_redirects=True, timeout=60)
        except httpx.HTTPError as exc:
            raise InstructEditError(f"{what} {location}: {exc or type(exc).__name__}") from None
        if response.status_code != 200:
            raise InstructEditError(f"{what} {location}: HTTP {response.status_code}")
        return response.content
    try:
        return Path(location).read_bytes()
    except OSError as exc:
        raise InstructEditError(f"{what} {location}: {exc.strerror or exc}") from None


def idempotency_key(nonce: str, item: Item, data: bytes, mask: bytes | None, attempt: int) -> str:
    digest = hashlib.sha256()
    identity = {
        "nonce": nonce,
        "key": item.key,
        "instruction": item.instruction,
        "params": item.params,
        "attempt": attempt,
    }
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    digest.update(hashlib.sha256(data).digest())
    digest.update(hashlib.sha256(mask or b"").digest())
    return f"instructedit-batch-{digest.hexdigest()}"


class Runner:
    def __init__(
        self,
        client: Client,
        journal: Journal,
        outdir: Path,
        on_progress: Callable[[Item, str, Job | None], None],
        stop: threading.Event,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.log = log
        self.client = client
        self.journal = journal
        self.outdir = outdir
        self.on_progress = on_progress
        self.stop = stop

    def process(self, item: Item) -> Outcome:
        key = item.key
        if item.problem:
            self.journal.record({"type": "failed", "key": key, "reason": item.problem})
            return Outcome(item, "failed", item.problem)
        try:
            job = self._job(item)
            if job is None:
                return Outcome(item, "stopped")
            job = job.wait(progress=lambda j: self.on_progress(item, "", j))
            if job.status != "succeeded":
                error = job.error or {}
                reason = (
                    f"{error.get('code')}: {error.get('message')}"
                    if job.status == "failed"
                    else f"job {job.id} was {job.status}"
                )
                self.journal.record(
                    {"type": "failed", "key": key, "job_id": job.id, "reason": reason}
                )
                return Outcome(item, "failed", reason, job.id)
            self.on_progress(item, "downloading", job)
            paths = self.client.download(job, self.outdir, stem=item.stem)
            names = [p.name for p in paths]
            self.journal.record(
                {
                    "type": "done",
                    "key": key,
                    "job_id": job.id,
                    "outputs": names,
                    "seed": (job.params or {}).get("seed"),
                }
            )
            return Outcome(item, "done", ", ".join(names), job.id, names)
        except APIConnectionError:
            raise  # the API is gone: the whole batch stops (and can be resumed)
        except APIError as exc:
            reason = f"{exc.code}: {exc.message}"
        except InstructEditError as exc:
            reason = str(exc)
        except (TypeError, ValueError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
        self.journal.record({"type": "failed", "key": key, "reason": reason})
        return Outcome(item, "failed", reason)

    def _job(self, item: Item) -> Job | None:
        """The item's job: the one already submitted, or a new submission."""
        pending = self.journal.pending_job(item.key)
        if pending is not None:
            try:
                job = self.client.get(pending)
            except NotFoundError:
                job = None
            if job is not None:
                self.on_progress(item, f"re-attached to job {job.id}", job)
                self.log(f"{item.label}: re-attached to job {job.id} ({job.status})")
                return job
        if self.stop.is_set():
            return None
        data = _read_source(item.source, "image")
        mask = _read_source(item.mask, "mask") if item.mask else None
        attempt = self.journal.attempt(item.key)
        key = idempotency_key(self.journal.nonce or "", item, data, mask, attempt)
        self.on_progress(item, "submitting", None)
        job = self.client.edit(
            data, item.instruction or "", mask=mask, idempotency_key=key, **item.params
        )
        self.journal.record(
            {
                "type": "submitted",
                "key": item.key,
                "job_id": job.id,
                "idempotency_key": key,
                "attempt": attempt,
            }
        )
        self.on_progress(item, "submitted", job)
        return job


def _describe(job: Job | None) -> str:
    if job is None:
        return ""
    if job.status == "queued":
        return "queued" + (f" #{job.queue_position}" if job.queue_position else "")
    if job.status == "running" and job.progress_total:
        return f"step {job.progress_step or 0}/{job.progress_total}"
    return str(job.status)


def run_batch(
    items: list[Item], outdir: Path, client: Client, concurrency: int, out: Console, err: Console
) -> int:
    """Run the batch; the number of items that failed. KeyboardInterrupt propagates after
    the journal is closed cleanly (running jobs are left to finish: a resumed run
    re-attaches to them)."""
    outdir.mkdir(parents=True, exist_ok=True)
    journal = Journal(outdir / STATE_NAME)
    outcomes: list[Outcome] = []
    todo: list[Item] = []
    for item in items:
        record = journal.done(item.key)
        if record is not None and all((outdir / n).exists() for n in record.get("outputs", [])):
            outcomes.append(
                Outcome(item, "skipped", "done before", record.get("job_id"), record["outputs"])
            )
        else:
            todo.append(item)

    work: queue.Queue[Item] = queue.Queue()
    for item in todo:
        work.put(item)
    results: queue.Queue[Outcome | BaseException] = queue.Queue()
    stop = threading.Event()
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )
    overall = progress.add_task("batch", total=len(items), completed=len(outcomes))
    tasks: dict[str, TaskID] = {}
    tasks_lock = threading.Lock()

    def on_progress(item: Item, note: str, job: Job | None) -> None:
        text = f"  {item.label}: {note or _describe(job)}"
        with tasks_lock:
            task = tasks.get(item.key)
            if task is None:
                tasks[item.key] = progress.add_task(text, total=None)
            else:
                total = job.progress_total if job is not None and job.status == "running" else None
                progress.update(
                    task,
                    description=text,
                    total=total or None,
                    completed=(job.progress_step or 0) if total and job is not None else 0,
                )

    def log(line: str) -> None:
        progress.console.print(line, markup=False, highlight=False)

    runner = Runner(client, journal, outdir, on_progress, stop, log)

    def worker() -> None:
        while not stop.is_set():
            try:
                item = work.get_nowait()
            except queue.Empty:
                return
            try:
                results.put(runner.process(item))
            except BaseException as exc:  # handed to the main thread
                results.put(exc)
                return

    if outcomes:
        err.print(f"{len(outcomes)} of {len(items)} already done (resuming)", markup=False)
    threads = [
        threading.Thread(target=worker, daemon=True, name=f"batch-{i}")
        for i in range(min(concurrency, len(todo)))
    ]
    remaining = len(todo)
    try:
        with progress:
            for thread in threads:
                thread.start()
            while remaining:
                try:
                    result = results.get(timeout=0.25)
                except queue.Empty:
                    if not any(t.is_alive() for t in threads) and results.empty():
                        break
                    continue
                if isinstance(result, BaseException):
                    raise result
                remaining -= 1
                with tasks_lock:
                    task = tasks.pop(result.item.key, None)
                    if task is not None:
                        progress.remove_task(task)
                if result.status == "stopped":
                    continue
                outcomes.append(result)
                progress.advance(overall)
                mark = "[green]done[/]" if result.status == "done" else "[red]failed[/]"
                progress.console.print(f"{mark} {result.item.label} \u2192 {result.detail}")
    except BaseException:
        stop.set()
        journal.close()
        done = sum(1 for o in outcomes if o.status in ("done", "skipped"))
        err.print(
            f"batch stopped: {done} of {len(items)} done; run the same command again to resume "
            f"(state: {journal.path})",
            markup=False,
        )
        raise
    journal.close()
    return _summary(outcomes, len(items), out)


def _summary(outcomes: list[Outcome], total: int, out: Console) -> int:
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("done", "skipped", "failed")}
    table = Table(title="batch summary")
    table.add_column("result")
    table.add_column("items", justify="right")
    table.add_row("[green]done[/]", str(counts["done"]))
    table.add_row("skipped (done before)", str(counts["skipped"]))
    table.add_row("[red]failed[/]" if counts["failed"] else "failed", str(counts["failed"]))
    table.add_row("total", str(total))
    out.print(table)
    failed = sorted((o for o in outcomes if o.status == "failed"), key=lambda o: o.item.index)
    if failed:
        reasons = Table(title="failed items")
        reasons.add_column("item")
        reasons.add_column("job")
        reasons.add_column("reason")
        for outcome in failed:
            reasons.add_row(outcome.item.label, outcome.job_id or "", outcome.detail)
        out.print(reasons)
    return counts["failed"]
