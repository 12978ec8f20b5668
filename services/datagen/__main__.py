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
    DEFAULT_EDIT_TYPES,
    EDIT_TYPE_NAMES,
    CatalogError,
    SpaceExhaustedError,
    load_catalog,
    resolve_edit_types,
    synthesize,
    write_jsonl,
)
from services.datagen.text.coherence import DEFAULT_MAX_ATTRIBUTES

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
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--rows", type=_non_negative_int, default=3000, help="rows (default 3000)")
    source.add_argument(
        "--captions",
        type=Path,
        default=None,
        metavar="FILE",
        help=(
            "map your own product captions to edit rows instead of sampling the catalog: "
            "JSON Lines (a string or {caption, category, product, attributes, id} per line) "
            "or plain text, one caption per line"
        ),
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", required=True, help="output .jsonl path, or - for stdout")
    parser.add_argument(
        "--catalog",
        type=Path,
        default=None,
        help="directory with common.yaml and category files (default: the packaged catalog)",
    )
    parser.add_argument(
        "--edits-per-caption",
        type=int,
        default=3,
        metavar="N",
        help="with --captions: rows per caption, each a different edit type (default 3)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="with --captions: exit 1 when any caption could not be mapped",
    )
    parser.add_argument(
        "--edit-types",
        type=_names,
        default=None,
        metavar="NAME,...",
        help=(
            "edit types to draw from (default: every one enabled by default; "
            f"opt-in: {', '.join(sorted(set(EDIT_TYPE_NAMES) - set(DEFAULT_EDIT_TYPES)))}). "
            f"Known: {', '.join(EDIT_TYPE_NAMES)}"
        ),
    )
    parser.add_argument(
        "--max-attributes",
        type=int,
        default=DEFAULT_MAX_ATTRIBUTES,
        metavar="N",
        help=(
            "most attribute words (color, material, style...) before the product noun "
            "(default %(default)s, so Stable Diffusion binds them all)"
        ),
    )
    parser.set_defaults(handler=run_text)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    try:
        resolve_edit_types(names)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def run_text(args: argparse.Namespace) -> int:
    if args.captions is not None:
        return run_text_captions(args)
    started = time.perf_counter()
    try:
        catalog = load_catalog(args.catalog)
        rows = synthesize(
            args.rows,
            args.seed,
            catalog,
            edit_types=args.edit_types,
            max_attributes=args.max_attributes,
        )
        count = write_jsonl(rows, args.out)
    except (CatalogError, SpaceExhaustedError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    print(
        f"wrote {count} rows (seed {args.seed}) to {args.out} in {elapsed:.2f}s",
        file=sys.stderr,
    )
    return 0


def run_text_captions(args: argparse.Namespace) -> int:
    """``text --captions FILE``: problems on stderr; exit 0 rows written (1 with
    --strict and a problem), 2 unreadable file or no caption gave a row."""
    from services.datagen.text.user_captions import CaptionFileError, map_caption_file

    started = time.perf_counter()
    if args.edits_per_caption < 1:
        print("error: --edits-per-caption must be at least 1", file=sys.stderr)
        return 2
    try:
        catalog = load_catalog(args.catalog)
        mapping = map_caption_file(
            args.captions,
            seed=args.seed,
            edits_per_caption=args.edits_per_caption,
            edit_types=args.edit_types,
            catalog=catalog,
        )
    except (CaptionFileError, CatalogError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in mapping.problems:
        print(
            f"{args.captions}:{problem.line}: {problem.reason}: {problem.caption!r}",
            file=sys.stderr,
        )
    if not mapping.rows:
        print(
            f"error: no caption in {args.captions} gave a row "
            f"({len(mapping.problems)} problem(s)); nothing written",
            file=sys.stderr,
        )
        return 2
    count = write_jsonl((_DictRow(row) for row in mapping.rows), args.out)
    elapsed = time.perf_counter() - started
    print(
        f"wrote {count} rows from {mapping.mapped} of {mapping.captions} captions "
        f"(seed {args.seed}, {len(mapping.problems)} problem(s)) to {args.out} "
        f"in {elapsed:.2f}s",
        file=sys.stderr,
    )
    return 1 if args.strict and mapping.problems else 0


class _DictRow(dict):
    """A row dict that write_jsonl can write (it calls ``to_dict``)."""

    def to_dict(self) -> dict:
        return self


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
    from services.common.datasets import DATAGEN_SCHEDULERS, DatasetSpec

    # Defaults: the dataset spec's (InstructPix2Pix's recipe, docs/DATAGEN.md).
    spec = DatasetSpec.model_fields

    def default(name: str):
        value = spec[name].default
        return value.value if hasattr(value, "value") else value

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--rows", type=_non_negative_int, help="caption rows to synthesize")
    source.add_argument(
        "--from-rows",
        type=Path,
        metavar="FILE",
        help=(
            "caption rows of your own (JSON Lines, as `text` writes them, e.g. from "
            "`text --captions`); they must pass the data audit"
        ),
    )
    parser.add_argument(
        "--edit-types",
        type=_names,
        default=None,
        metavar="NAME,...",
        help="with --rows: edit types to draw from (default: those enabled by default)",
    )
    parser.add_argument(
        "--max-attributes",
        type=int,
        default=DEFAULT_MAX_ATTRIBUTES,
        metavar="N",
        help="with --rows: most attribute words before the noun (default %(default)s)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=default("pairs_per_row"),
        help="image pairs kept per row at most (default %(default)s)",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=None,
        help="candidate pairs a row may try (default: 100 with the filter, --pairs without)",
    )
    parser.add_argument(
        "--candidate-batch-size",
        type=int,
        default=default("candidate_batch_size"),
        help="candidates per UNet batch (default %(default)s)",
    )
    parser.add_argument("--out", required=True, help="storage URL: file://DIR or s3://BUCKET/P")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="SD 1.x hub id or directory")
    parser.add_argument(
        "--scheduler",
        default=default("scheduler"),
        choices=[*DATAGEN_SCHEDULERS, "model"],
        help="sampler (default %(default)s; model: the model's own)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=default("num_inference_steps"),
        help="denoising steps (default %(default)s)",
    )
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels")
    parser.add_argument("--p-range", type=_range, default=default("p_range"), metavar="MIN,MAX")
    parser.add_argument(
        "--guidance-range", type=_range, default=default("text_guidance_range"), metavar="MIN,MAX"
    )
    parser.add_argument(
        "--cross-attention-fraction",
        type=float,
        default=None,
        help="fraction of the steps with cross-attention injected (default: none)",
    )
    parser.add_argument("--negative-prompt", default=None, help="(default: none)")
    parser.add_argument(
        "--filter",
        action=argparse.BooleanOptionalAction,
        default=default("filter"),
        help="CLIP-filter the candidates (default: on)",
    )
    parser.add_argument("--clip-model", default=None)
    for name in ("min_caption_similarity", "min_directional_similarity", "min_image_similarity"):
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=float,
            default=default(name),
            help=f"filter threshold (default %(default)s): {spec[name].description}",
        )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.set_defaults(handler=run_pipeline)


def run_pipeline(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from tqdm import tqdm

    from services.common.datasets import DatasetSpec
    from services.common.settings import Settings
    from services.common.storage import open_storage
    from services.datagen.builder import DatasetBuilder, clip_filter_for, generator_for

    rows = None
    if args.from_rows is not None:
        rows = _audited_rows(args.from_rows)
        if rows is None:
            return 2
    try:
        spec = DatasetSpec(
            num_rows=args.rows,
            rows=rows,
            edit_types=args.edit_types,
            max_attributes=args.max_attributes,
            seed=args.seed,
            pairs_per_row=args.pairs,
            candidates_per_row=args.candidates,
            candidate_batch_size=args.candidate_batch_size,
            model=args.model,
            scheduler=None if args.scheduler == "model" else args.scheduler,
            num_inference_steps=args.steps,
            resolution=args.resolution,
            p_range=args.p_range,
            text_guidance_range=args.guidance_range,
            cross_attention_fraction=args.cross_attention_fraction,
            negative_prompt=args.negative_prompt,
            filter=args.filter,
            clip_model=args.clip_model,
            min_caption_similarity=args.min_caption_similarity,
            min_directional_similarity=args.min_directional_similarity,
            min_image_similarity=args.min_image_similarity,
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
            bar.set_postfix(pairs=kept, candidates=generated, refresh=False)
            bar.update()
    if kept == 0 and spec.total_rows:
        from services.datagen.run_tasks import NO_PAIRS_KEPT, no_pairs_kept_message

        message = no_pairs_kept_message(spec.total_rows, generated)
        print(f"error: run {run_id}: {NO_PAIRS_KEPT}: {message}", file=sys.stderr)
        return 1
    summary = builder.export()
    print(
        f"run {run_id}: {spec.total_rows} rows ({skipped} already stored), "
        f"{kept} of {generated} candidate pairs kept; dataset: {args.out.rstrip('/')}/"
        f"{summary.card_key.rsplit('/', 1)[0]} ({len(summary.shard_keys)} shard(s))",
        file=sys.stderr,
    )
    return 0


def _audited_rows(path: Path) -> list | None:
    """The caption rows in ``path`` if they pass the data audit; None (with the audit's
    report on stderr) if they do not or cannot be read."""
    from services.common.datasets import RowInput
    from services.datagen.audit import AuditInputError, audit_rows, read_rows

    try:
        rows = read_rows(path)
    except AuditInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    report = audit_rows(rows)
    if not report.clean:
        print(report.format_table(), file=sys.stderr)
        print(f"error: {path}: the rows fail the data audit; fix them first", file=sys.stderr)
        return None
    fields = ("input_caption", "instruction", "output_caption", "category", "edit_type")
    return [RowInput(**{key: row[key] for key in fields if key in row}) for row in rows]


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
