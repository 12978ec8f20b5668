"""Command line of the dataset generator: ``python -m services.datagen COMMAND``.

Each subcommand is one ``add_*_command`` function that registers its parser
and sets ``handler``; adding a stage means writing such a function and
listing it in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
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


# Subcommand registrars, in help order. The image-pair stage adds its own here.
COMMANDS: tuple[Callable[[Subparsers], None], ...] = (add_text_command,)


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
