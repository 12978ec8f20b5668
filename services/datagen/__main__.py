"""Command line of the dataset generator: ``python -m services.datagen COMMAND``.

Each subcommand is one ``add_*_command`` function that registers its parser
and sets ``handler``; adding a stage means writing such a function and
listing it in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

from services.datagen.text import (
    CatalogError,
    SpaceExhaustedError,
    load_catalog,
    synthesize,
    write_jsonl,
)

# What add_subparsers() returns; each subcommand registers itself on it.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_text_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "text",
        help="synthesize (input caption, instruction, output caption) rows as JSON Lines",
        description=(
            "Generate unique, balanced edit rows from the product catalog. "
            "The same --rows/--seed always give a byte-identical file."
        ),
    )
    parser.add_argument("--rows", type=_non_negative_int, default=3000, help="rows (default 3000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", required=True, help="output .jsonl path, or - for stdout")
    parser.add_argument(
        "--catalog",
        type=Path,
        default=None,
        help="directory with common.yaml and category files (default: the packaged catalog)",
    )
    parser.set_defaults(handler=run_text)


def run_text(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        catalog = load_catalog(args.catalog)
        count = write_jsonl(synthesize(args.rows, args.seed, catalog), args.out)
    except (CatalogError, SpaceExhaustedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    print(
        f"wrote {count} rows (seed {args.seed}) to {args.out} in {elapsed:.2f}s",
        file=sys.stderr,
    )
    return 0


def _range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, got {text!r}") from None
    return low, high


def add_run_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="generate image pairs and export the dataset, in this process",
        description=(
            "The service's pipeline without the cluster: caption rows from the synthesizer, "
            "image pairs by Stable Diffusion + Prompt-to-Prompt, optional CLIP filtering, "
            "Parquet export. Re-running the same command resumes: stored rows are skipped."
        ),
    )
    parser.add_argument("--rows", type=_non_negative_int, required=True, help="caption rows")
    parser.add_argument("--pairs", type=int, default=4, help="image pairs per row (default 4)")
    parser.add_argument("--out", required=True, help="storage URL: file://DIR or s3://BUCKET/P")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="SD 1.x hub id or directory")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels")
    parser.add_argument("--p-range", type=_range, default=(0.1, 0.9), metavar="MIN,MAX")
    parser.add_argument("--guidance-range", type=_range, default=(7.5, 15.0), metavar="MIN,MAX")
    parser.add_argument("--filter", action="store_true", help="CLIP-filter the pairs")
    parser.add_argument("--clip-model", default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.set_defaults(handler=run_pipeline)


def run_pipeline(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from tqdm import tqdm

    from services.common.datasets import DatasetSpec
    from services.common.settings import Settings
    from services.common.storage import open_storage
    from services.datagen.builder import DatasetBuilder, clip_filter_for, generator_for

    try:
        spec = DatasetSpec(
            num_rows=args.rows,
            seed=args.seed,
            pairs_per_row=args.pairs,
            model=args.model,
            num_inference_steps=args.steps,
            resolution=args.resolution,
            p_range=args.p_range,
            text_guidance_range=args.guidance_range,
            filter=args.filter,
            clip_model=args.clip_model,
        )
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = Settings(storage_url=args.out, device=args.device)
    storage = open_storage(settings)
    run_id = spec.run_id()
    builder = DatasetBuilder(
        run_id,
        spec,
        storage,
        generator_for(spec, settings.datagen_model, settings.device),
        clip_filter_for(spec, settings.device),
    )
    generated = kept = skipped = 0
    with tqdm(total=spec.total_rows, unit="row", desc=f"run {run_id}") as bar:
        for index in range(spec.total_rows):
            outcome = builder.process_row(index)
            generated += outcome.generated
            kept += outcome.kept
            skipped += outcome.skipped
            bar.set_postfix(pairs=kept, refresh=False)
            bar.update()
    summary = builder.export()
    print(
        f"run {run_id}: {spec.total_rows} rows ({skipped} already stored), "
        f"{kept} of {generated} pairs kept; dataset: {args.out.rstrip('/')}/"
        f"{summary.card_key.rsplit('/', 1)[0]} ({len(summary.shard_keys)} shard(s))",
        file=sys.stderr,
    )
    return 0


def add_audit_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="check caption rows (JSON Lines) against data-quality rules",
        description=(
            "Report, per rule, the rows that break it, with counts and examples. "
            "Exit status: 0 clean, 1 some rule broken, 2 unreadable input."
        ),
    )
    parser.add_argument("rows", help="JSON Lines file as written by the text command")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--examples",
        type=_non_negative_int,
        default=3,
        help="example rows shown per rule (default 3)",
    )
    parser.set_defaults(handler=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    from services.datagen.audit import AuditInputError, audit_rows, read_rows

    try:
        report = audit_rows(read_rows(args.rows), examples=args.examples)
    except AuditInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(report.format_table())
    return 0 if report.clean else 1


# Subcommand registrars, in help order.
COMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    add_text_command,
    add_run_command,
    add_audit_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.datagen",
        description="Generate the InstructEdit product edit dataset.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
