"""`instructedit`: the command line of the InstructEdit API.

Exit codes: 0 success; 1 an API error or a failed job ("error: <code>: <message>");
2 a usage error or a bad input file (missing, or refused by the API as not an image);
3 the API cannot be reached; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from instructedit import (
    APIConnectionError,
    APIError,
    Client,
    InstructEditError,
    Job,
)

app = typer.Typer(
    name="instructedit",
    help="Edit product photos by text instruction with the InstructEdit API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
datasets_app = typer.Typer(help="Generate edit datasets (runs of the dataset generator).")
app.add_typer(datasets_app, name="datasets")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_API = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

# API error codes that mean "this input file is not a usable image": exit 2, like a
# missing file, rather than 1.
BAD_FILE_CODES = {
    "empty_image",
    "not_an_image",
    "unsupported_image_format",
    "corrupt_image",
    "image_too_large",
    "upload_too_large",
}
FORMAT_BY_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
FINISHED = ("succeeded", "failed", "canceled")


class Settings:
    """The global options, resolved once; the client is made on first use."""

    def __init__(self, url: str | None, api_key: str | None, max_retries: int = 5) -> None:
        self.url = url
        self.api_key = api_key
        self.max_retries = max_retries
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.url, self.api_key, max_retries=self.max_retries)
        return self._client


_settings = Settings(None, None)


class CLIError(Exception):
    """A failure reported as one line on stderr, with an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_API) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


def fail(message: str, exit_code: int = EXIT_API) -> typer.Exit:
    err.print(message, markup=False)
    return typer.Exit(exit_code)


def api_error_exit(exc: APIError) -> typer.Exit:
    code = EXIT_USAGE if exc.code in BAD_FILE_CODES or exc.code.startswith("mask_") else EXIT_API
    lines = [f"error: {exc.code}: {exc.message}"]
    # Item by item where the API says (captions it could not map, rows an audit rule
    # rejects): one line each, so the file can be fixed.
    for detail in exc.details or ():
        lines.append("  " + json.dumps(detail, ensure_ascii=False))
    return fail("\n".join(lines), code)


@contextlib.contextmanager
def handled_errors() -> Iterator[None]:
    """SDK exceptions, interrupts and local failures as one line and an exit code."""
    try:
        yield
    except CLIError as exc:
        plain = exc.message.startswith(("error", "interrupted"))
        raise fail(exc.message if plain else f"error: {exc.message}", exc.exit_code) from None
    except APIConnectionError as exc:
        message = str(exc)
        if "cannot reach" not in message:
            url = exc.url or _settings.url or os.environ.get("INSTRUCTEDIT_URL", "")
            message = f"cannot reach the InstructEdit API at {url}: {message}"
        raise fail(f"error: {message}", EXIT_UNREACHABLE) from None
    except APIError as exc:
        raise api_error_exit(exc) from None
    except InstructEditError as exc:
        raise fail(f"error: {exc}") from None
    except OSError as exc:  # writing an output, reading an input
        where = f"{exc.filename}: " if exc.filename else ""
        raise fail(f"error: {where}{exc.strerror or exc}") from None
    except KeyboardInterrupt:
        raise fail("interrupted", EXIT_INTERRUPTED) from None
    except Terminated:
        raise fail("terminated", EXIT_TERMINATED) from None


F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with handled_errors():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@app.callback()
def _global_options(
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            envvar="INSTRUCTEDIT_URL",
            help="API base URL (default http://127.0.0.1:8000)",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar="INSTRUCTEDIT_API_KEY", help="API key", show_default=False
        ),
    ] = None,
    retries: Annotated[
        int,
        typer.Option(
            "--retries",
            min=0,
            max=20,
            help="retries of a request that failed on the network, 429 or 503 (backoff)",
        ),
    ] = 5,
) -> None:
    global _settings
    _settings = Settings(url or None, api_key or None, retries)


# ---------------------------------------------------------------------------------------
# Shared helpers


def check_input_file(path: Path, what: str = "image") -> Path:
    if not path.exists():
        raise CLIError(f"{path}: no such file", EXIT_USAGE)
    if not path.is_file():
        raise CLIError(f"{path}: not a file", EXIT_USAGE)
    if not os.access(path, os.R_OK):
        raise CLIError(f"{path}: permission denied", EXIT_USAGE)
    return path


def edit_params(
    *,
    steps: int | None = None,
    guidance: float | None = None,
    image_guidance: float | None = None,
    seed: int | None = None,
    outputs: int | None = None,
    scheduler: str | None = None,
    output_format: str | None = None,
    quality: int | None = None,
    negative_prompt: str | None = None,
) -> dict[str, Any]:
    """The EditParams keyword arguments given on the command line (None: not given)."""
    params = {
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "image_guidance_scale": image_guidance,
        "seed": seed,
        "num_outputs": outputs,
        "scheduler": scheduler,
        "output_format": output_format,
        "output_quality": quality,
        "negative_prompt": negative_prompt,
    }
    return {name: value for name, value in params.items() if value is not None}


def job_dict(job: Job) -> dict[str, Any]:
    for attribute in ("raw", "data", "_data"):
        value = getattr(job, attribute, None)
        if isinstance(value, dict) and value.get("id") == job.id:
            return value
    return {
        "id": job.id,
        "status": job.status,
        "params": job.params,
        "progress": {"step": job.progress_step, "total": job.progress_total},
        "outputs": list(job.outputs),
        "error": job.error,
        "queue_position": job.queue_position,
        "estimated_wait_s": job.estimated_wait_s,
    }


def describe(job: Job) -> str:
    """One phrase for where a job stands."""
    if job.status == "queued":
        parts = []
        if job.queue_position is not None:
            parts.append(f"position {job.queue_position}")
        if job.estimated_wait_s is not None:
            parts.append(f"~{job.estimated_wait_s:.0f}s")
        return "queued" + (f" ({', '.join(parts)})" if parts else "")
    if job.status == "running" and job.progress_total:
        return f"running step {job.progress_step or 0}/{job.progress_total}"
    return str(job.status)


def job_error_text(job: Job) -> str:
    if job.status == "canceled":
        return f"canceled: job {job.id} was canceled"
    error = job.error or {}
    return f"{error.get('code') or 'failed'}: {error.get('message') or f'job {job.id} failed'}"


def progress_bar(console: Console = err) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def follow(job: Job, label: str = "edit") -> Job:
    """Wait for a job with a progress bar on stderr: queue position, then steps."""
    with progress_bar() as progress:
        task = progress.add_task(f"{label}: {describe(job)}", total=None)

        def update(current: Job) -> None:
            total = current.progress_total if current.status == "running" else None
            progress.update(
                task,
                description=f"{label}: {describe(current)}",
                total=total or None,
                completed=(current.progress_step or 0) if total else 0,
            )

        return job.wait(progress=update)


def resolve_output(output: Path | None, image: Path, output_format: str | None):
    """(directory, stem, suffix or None, format or None) for -o: a file or a directory."""
    if output is None:
        return Path.cwd(), f"{image.stem}-edited", None, output_format
    text = str(output)
    if output.is_dir() or text.endswith(("/", os.sep)) or not output.suffix:
        return output, image.stem, None, output_format
    suffix = output.suffix.lower()
    if output_format is None:
        output_format = FORMAT_BY_SUFFIX.get(suffix)
        if output_format is None:
            known = ", ".join(FORMAT_BY_SUFFIX)
            raise CLIError(
                f"{output}: cannot tell the output format from {suffix!r} "
                f"(use one of {known}, or --format)",
                EXIT_USAGE,
            )
    return output.parent, output.stem, output.suffix, output_format


def place(paths: list[Path], directory: Path, stem: str, suffix: str | None) -> list[Path]:
    """The downloaded files renamed to what -o asked for (out.jpg, not out.jpeg)."""
    if suffix is None:
        return paths
    if len(paths) == 1:
        wanted = [directory / f"{stem}{suffix}"]
    else:
        wanted = [directory / f"{stem}-{i}{suffix}" for i in range(len(paths))]
    placed = []
    for path, target in zip(paths, wanted, strict=True):
        if path != target:
            os.replace(path, target)
        placed.append(target)
    return placed


def _scheduler_names() -> list[str]:
    try:
        from services.common.schedulers import Scheduler

        return [s.value for s in Scheduler]
    except ImportError:  # pragma: no cover - the SDK without the services package
        return ["euler_ancestral", "..."]


class Format(StrEnum):
    png = "png"
    jpeg = "jpeg"
    webp = "webp"


StepsOpt = Annotated[int | None, typer.Option("--steps", help="denoising steps (1-100)")]
GuidanceOpt = Annotated[
    float | None, typer.Option("--guidance", help="text guidance S_T (0-30, default 7.5)")
]
ImageGuidanceOpt = Annotated[
    float | None,
    typer.Option("--image-guidance", help="image guidance S_I (0-10, default 1.5)"),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="random seed (random if absent)")]
OutputsOpt = Annotated[
    int | None, typer.Option("--outputs", "-n", help="variations of the edit (1-4)")
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option("--scheduler", help=f"denoising sampler: {', '.join(_scheduler_names())}"),
]
FormatOpt = Annotated[
    Format | None,
    typer.Option("--format", help="output format (default: from -o's extension, else png)"),
]
QualityOpt = Annotated[
    int | None, typer.Option("--quality", help="jpeg/webp quality (1-100, default 90)")
]
NegativeOpt = Annotated[
    str | None, typer.Option("--negative-prompt", help="what to steer away from")
]


def _value(option: StrEnum | None) -> str | None:
    return option.value if option is not None else None


# ---------------------------------------------------------------------------------------
# Commands


@app.command()
@handles_errors
def edit(
    image: Annotated[Path, typer.Argument(help="the photo to edit", show_default=False)],
    instruction: Annotated[str, typer.Argument(help='the edit, e.g. "make it red"')],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="output file (format from its extension) or directory; several outputs: "
            "out-0.png, out-1.png, ... (default: ./<photo>-edited.png)",
            show_default=False,
        ),
    ] = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    image_guidance: ImageGuidanceOpt = None,
    seed: SeedOpt = None,
    outputs: OutputsOpt = None,
    scheduler: SchedulerOpt = None,
    mask: Annotated[
        Path | None,
        typer.Option("--mask", help="white may change, black is kept", show_default=False),
    ] = None,
    output_format: FormatOpt = None,
    quality: QualityOpt = None,
    negative_prompt: NegativeOpt = None,
) -> None:
    """Edit a photo by instruction; prints the output path(s) and the seed used."""
    check_input_file(image)
    if mask is not None:
        check_input_file(mask, "mask")
    directory, stem, suffix, fmt = resolve_output(output, image, _value(output_format))
    params = edit_params(
        steps=steps,
        guidance=guidance,
        image_guidance=image_guidance,
        seed=seed,
        outputs=outputs,
        scheduler=scheduler,
        output_format=fmt,
        quality=quality,
        negative_prompt=negative_prompt,
    )
    job = _settings.client.edit(image, instruction, mask=mask, **params)
    try:
        # Inside: an interrupt from the moment the job is announced names it.
        err.print(f"submitted {job.id}", markup=False)
        job = follow(job)
    except KeyboardInterrupt:
        raise CLIError(
            f"interrupted (job {job.id} goes on: `instructedit cancel {job.id}` stops it)",
            EXIT_INTERRUPTED,
        ) from None
    if job.status != "succeeded":
        raise CLIError(f"error: {job_error_text(job)}")
    directory.mkdir(parents=True, exist_ok=True)
    paths = place(job.download(directory, stem=stem), directory, stem, suffix)
    for path in paths:
        out.print(str(path), markup=False)
    out.print(f"seed: {job.params.get('seed')}", markup=False)


@app.command()
@handles_errors
def status(
    job_id: Annotated[str, typer.Argument(help="the job's id")],
    as_json: Annotated[bool, typer.Option("--json", help="print the job as JSON")] = False,
) -> None:
    """Show a job: state, progress, parameters, outputs."""
    job = _settings.client.get(job_id)
    if as_json:
        print(json.dumps(job_dict(job), indent=2, default=str))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("id", job.id)
    table.add_row("status", str(job.status))
    if job.status == "queued" and job.queue_position is not None:
        table.add_row("queue position", str(job.queue_position))
    if job.estimated_wait_s is not None:
        table.add_row("estimated wait", f"{job.estimated_wait_s:.0f}s")
    if job.progress_total:
        table.add_row("progress", f"{job.progress_step or 0}/{job.progress_total} steps")
    params = job.params or {}
    for name in (
        "prompt",
        "seed",
        "num_inference_steps",
        "guidance_scale",
        "image_guidance_scale",
        "num_outputs",
        "scheduler",
        "output_format",
    ):
        if params.get(name) is not None:
            table.add_row(name, str(params[name]))
    if job.error:
        table.add_row("error", f"{job.error.get('code')}: {job.error.get('message')}")
    for i, url in enumerate(job.outputs or ()):
        table.add_row("output" if i == 0 else "", str(url))
    out.print(table)


@app.command()
@handles_errors
def cancel(job_id: Annotated[str, typer.Argument(help="the job's id")]) -> None:
    """Cancel a queued or running job."""
    job = _settings.client.cancel(job_id)
    out.print(f"{job.id} {job.status}", markup=False)


@app.command()
@handles_errors
def delete(job_id: Annotated[str, typer.Argument(help="the job's id")]) -> None:
    """Delete a finished job and its outputs."""
    _settings.client.delete(job_id)
    out.print(f"{job_id} deleted", markup=False)


class Status(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


@app.command("list")
@handles_errors
def list_jobs(
    status_filter: Annotated[
        Status | None, typer.Option("--status", help="only jobs in this state")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many jobs")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
) -> None:
    """List your jobs, newest first."""
    jobs = _settings.client.list(status=_value(status_filter), limit=limit)
    if as_json:
        for i, job in enumerate(jobs):
            if i >= limit:
                break
            print(json.dumps(job_dict(job), default=str))
        return
    table = Table("id", "status", "progress", "seed", "prompt")
    for i, job in enumerate(jobs):
        if i >= limit:
            break
        params = job.params or {}
        progress = f"{job.progress_step or 0}/{job.progress_total}" if job.progress_total else ""
        table.add_row(
            job.id, str(job.status), progress, str(params.get("seed", "")), params.get("prompt", "")
        )
    out.print(table)


def parse_scales(text: str, option: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CLIError(f"{option}: expected numbers separated by commas, got {text!r}", 2) from None
    if not values:
        raise CLIError(f"{option}: give at least one value", EXIT_USAGE)
    return list(dict.fromkeys(values))


@app.command()
@handles_errors
def grid(
    image: Annotated[Path, typer.Argument(help="the photo to edit", show_default=False)],
    instruction: Annotated[str, typer.Argument(help="the edit instruction")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="the contact sheet (png, jpg or webp)")
    ] = Path("grid.png"),
    image_guidance: Annotated[
        str, typer.Option("--image-guidance", help="image guidance values S_I (rows)")
    ] = "1,1.5,2",
    guidance: Annotated[
        str, typer.Option("--guidance", help="text guidance values S_T (columns)")
    ] = "5,7.5,10",
    seed: SeedOpt = None,
    steps: StepsOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Sweep image guidance S_I x text guidance S_T (one seed) into a contact sheet."""
    from PIL import Image

    from instructedit.contact_sheet import compose

    check_input_file(image)
    image_scales = parse_scales(image_guidance, "--image-guidance")
    text_scales = parse_scales(guidance, "--guidance")
    fmt = FORMAT_BY_SUFFIX.get(output.suffix.lower())
    if fmt is None:
        raise CLIError(f"{output}: the contact sheet must be .png, .jpg or .webp", EXIT_USAGE)
    if seed is None:
        seed = secrets.randbelow(2**32)
    data = image.read_bytes()
    client = _settings.client
    jobs: dict[tuple[float, float], Job] = {}
    for s_i in image_scales:
        for s_t in text_scales:
            params = edit_params(steps=steps, seed=seed, scheduler=scheduler)
            jobs[(s_i, s_t)] = client.edit(
                data, instruction, guidance_scale=s_t, image_guidance_scale=s_i, **params
            )
    err.print(f"submitted {len(jobs)} jobs (seed {seed})", markup=False)
    cells: dict[tuple[float, float], Image.Image | str] = {}
    failures = 0
    with progress_bar() as progress, tempfile.TemporaryDirectory() as tmp:
        task = progress.add_task("sweep", total=len(jobs))
        for (s_i, s_t), job in jobs.items():
            label = f"S_I {s_i:g} S_T {s_t:g}"

            def update(current: Job, label: str = label) -> None:
                progress.update(task, description=f"{label}: {describe(current)}")

            job = job.wait(progress=update)
            progress.advance(task)
            if job.status != "succeeded":
                failures += 1
                cells[(s_i, s_t)] = job_error_text(job)
                err.print(f"{label}: {job_error_text(job)}", markup=False)
                continue
            paths = client.download(job, Path(tmp), stem=f"{job.id}")
            with Image.open(paths[0]) as edited:
                cells[(s_i, s_t)] = edited.convert("RGB")
    sheet = compose(cells, image_scales, text_scales, title=f'"{instruction}"  seed {seed}')
    output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(output, format={"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
    out.print(str(output), markup=False)
    out.print(f"seed: {seed}", markup=False)
    if failures:
        raise CLIError(f"error: {failures} of {len(jobs)} edits failed")


# ---------------------------------------------------------------------------------------
# datasets


def print_mapping(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in _flat(data):
        table.add_row(key, value)
    out.print(table)


def _flat(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, text) for every value that is set, nested mappings flattened."""
    for key, value in data.items():
        if value is None or value == [] or value == "":
            continue
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            yield f"{prefix}{key}", ", ".join(json.dumps(v, default=str) for v in value)
        else:
            yield f"{prefix}{key}", str(value)


def read_caption_lines(path: Path) -> list[Any]:
    """A captions file as the API takes it: each line a JSON string or object, or plain
    text; blank lines and lines starting with # are skipped."""
    captions: list[Any] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        captions.append(value if isinstance(value, str | dict) else text)
    if not captions:
        raise CLIError(f"{path}: no captions", EXIT_USAGE)
    return captions


@datasets_app.command("create")
@handles_errors
def datasets_create(
    rows: Annotated[int | None, typer.Option("--rows", help="caption rows to synthesize")] = None,
    captions: Annotated[
        Path | None,
        typer.Option(
            "--captions",
            help="your own product captions instead of --rows: plain text (one per line) "
            "or JSON Lines (a string or {caption, category, product, attributes, id})",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    edits_per_caption: Annotated[
        int | None, typer.Option("--edits-per-caption", help="rows per caption (1-10)")
    ] = None,
    edit_types: Annotated[
        str | None,
        typer.Option("--edit-types", help="comma-separated edit types (default: the defaults)"),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="the synthesizer's seed")] = 0,
    pairs: Annotated[
        int | None, typer.Option("--pairs", help="image pairs kept per row (1-16)")
    ] = None,
    candidates: Annotated[
        int | None,
        typer.Option("--candidates", help="candidate pairs per row (default 100 with the filter)"),
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="text-to-image denoising steps")
    ] = None,
    resolution: Annotated[int | None, typer.Option("--resolution", help="pixels")] = None,
    model: Annotated[str | None, typer.Option("--model", help="text-to-image model id")] = None,
    clip_filter: Annotated[
        bool | None, typer.Option("--filter/--no-filter", help="CLIP-filter the pairs")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the run as JSON")] = False,
) -> None:
    """Start a dataset generation run: --rows synthesized captions, or your own --captions."""
    if (rows is None) == (captions is None):
        raise CLIError("give --rows or --captions (one of them)", EXIT_USAGE)
    spec: dict[str, Any] = {"seed": seed}
    if captions is not None:
        spec["captions"] = read_caption_lines(captions)
    else:
        spec["num_rows"] = rows
    for name, value in (
        ("edits_per_caption", edits_per_caption),
        ("edit_types", edit_types.split(",") if edit_types else None),
        ("candidates_per_row", candidates),
        ("pairs_per_row", pairs),
        ("num_inference_steps", steps),
        ("resolution", resolution),
        ("model", model),
        ("filter", clip_filter),
    ):
        if value is not None:
            spec[name] = value
    print_mapping(_settings.client.datasets.create(**spec), as_json)


@datasets_app.command("status")
@handles_errors
def datasets_status(
    run_id: Annotated[str, typer.Argument(help="the run's id")],
    as_json: Annotated[bool, typer.Option("--json", help="print the run as JSON")] = False,
) -> None:
    """Show a dataset run."""
    print_mapping(_settings.client.datasets.get(run_id), as_json)


@datasets_app.command("cancel")
@handles_errors
def datasets_cancel(
    run_id: Annotated[str, typer.Argument(help="the run's id")],
    as_json: Annotated[bool, typer.Option("--json", help="print the run as JSON")] = False,
) -> None:
    """Cancel a dataset run."""
    print_mapping(_settings.client.datasets.cancel(run_id), as_json)


# ---------------------------------------------------------------------------------------
# batch


@app.command()
@handles_errors
def batch(
    source: Annotated[
        Path,
        typer.Argument(
            help="a folder of images, or a CSV/JSONL manifest (columns: image, instruction, "
            "and any edit parameter by its API name, e.g. seed, num_inference_steps)",
            show_default=False,
        ),
    ],
    instruction: Annotated[
        str | None,
        typer.Argument(help="the instruction for every item (a manifest row's own wins)"),
    ] = None,
    outdir: Annotated[
        Path, typer.Option("--output", "-o", help="the output folder (also keeps the state)")
    ] = Path("edited"),
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-j", min=1, max=64, help="jobs in flight at once")
    ] = 4,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    image_guidance: ImageGuidanceOpt = None,
    seed: SeedOpt = None,
    outputs: OutputsOpt = None,
    scheduler: SchedulerOpt = None,
    output_format: FormatOpt = None,
    quality: QualityOpt = None,
    negative_prompt: NegativeOpt = None,
) -> None:
    """Edit a catalog: resumable (run it again after an interruption), bounded concurrency."""
    from instructedit.batch import BatchError, load_items, run_batch

    if not source.exists():
        raise CLIError(f"{source}: no such file or folder", EXIT_USAGE)
    defaults = edit_params(
        steps=steps,
        guidance=guidance,
        image_guidance=image_guidance,
        seed=seed,
        outputs=outputs,
        scheduler=scheduler,
        output_format=_value(output_format),
        quality=quality,
        negative_prompt=negative_prompt,
    )
    try:
        items = load_items(source, instruction, defaults)
    except BatchError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    if not items:
        raise CLIError(f"{source}: no images found", EXIT_USAGE)
    failed = run_batch(items, outdir, _settings.client, concurrency, out, err)
    if failed:
        raise typer.Exit(EXIT_API)


# ---------------------------------------------------------------------------------------


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def main() -> None:
    """The console script."""
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app(prog_name="instructedit")
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Terminated:
        err.print("terminated")
        sys.exit(EXIT_TERMINATED)


if __name__ == "__main__":
    main()
