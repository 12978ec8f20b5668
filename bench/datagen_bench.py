"""Throughput of the dataset generator's stages.

    python bench/datagen_bench.py                    # every part (today: text)
    python bench/datagen_bench.py --text --rows 3000 100000 --repeat 3

Each part is a ``bench_*`` function registered in ``PARTS`` with its flag;
a part prints its own table. Timings are wall-clock on whatever machine runs
it, best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# Runnable as a plain script from anywhere: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.datagen.text import load_catalog, row_to_json, synthesize


def bench_text(args: argparse.Namespace) -> None:
    """Text rows per second: generation, then JSON Lines encoding of the same rows."""
    catalog = load_catalog()  # parse the YAML once, outside the timings

    print(f"text synthesizer (seed {args.seed}, best of {args.repeat})")
    header = ("rows", "generate s", "rows/s", "encode s", "rows/s", "total rows/s")
    widths = (9, 10, 8, 8, 8, 12)
    print(" | ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for rows in args.rows:
        generate = encode = float("inf")
        for _ in range(args.repeat):
            started = time.perf_counter()
            batch = list(synthesize(rows, args.seed, catalog))
            generated = time.perf_counter()
            for row in batch:
                row_to_json(row)
            generate = min(generate, generated - started)
            encode = min(encode, time.perf_counter() - generated)
            del batch
        cells = (rows, generate, rows / generate, encode, rows / encode, rows / (generate + encode))
        formats = ("d", ".2f", ".0f", ".2f", ".0f", ".0f")
        print(" | ".join(f"{c:>{w}{f}}" for c, w, f in zip(cells, widths, formats, strict=True)))


# flag -> (help, bench function). The image-pair stage adds "--images" here.
PARTS: dict[str, tuple[str, Callable[[argparse.Namespace], None]]] = {
    "text": ("benchmark the text synthesizer", bench_text),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, (help_text, _) in PARTS.items():
        parser.add_argument(f"--{name}", action="store_true", help=help_text)
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[3000, 100_000],
        help="text row counts to time (default: 3000 100000)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="runs per size; best is kept")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = [name for name in PARTS if getattr(args, name)] or list(PARTS)
    for index, name in enumerate(chosen):
        if index:
            print()
        PARTS[name][1](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
