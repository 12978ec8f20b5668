"""Throughput of the dataset generator's stages.

    python bench/datagen_bench.py                    # every part (text, images)
    python bench/datagen_bench.py --text --rows 3000 100000 --repeat 3
    python bench/datagen_bench.py --images           # tiny random SD on the CPU
    python bench/datagen_bench.py --images --full-size --image-rows 8   # on a GPU

Each part is a ``bench_*`` function registered in ``PARTS`` with its flag;
a part prints its own table. Timings are wall-clock on whatever machine runs
it, best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
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


def build_full_size_pipeline(device: str):
    """Stable Diffusion 1.5's architecture with random weights (bench/full_size.py)."""
    from diffusers import StableDiffusionPipeline

    from bench.full_size import full_size_components
    from services.common.diffusion import resolve_device, serving_dtype
    from services.datagen.tiny_sd import build_scheduler

    target = resolve_device(device)
    dtype = serving_dtype(target)
    pipe = StableDiffusionPipeline(
        **full_size_components(4, target),
        scheduler=build_scheduler("pndm"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(dtype=dtype)


def bench_images(args: argparse.Namespace) -> None:
    """Image pairs per second: Stable Diffusion + Prompt-to-Prompt, then Parquet export."""
    import tempfile

    from services.common.storage import FileStorage
    from services.datagen.dataset_export import export_dataset
    from services.datagen.pair_params import PairSampling, pair_params_for_row
    from services.datagen.pair_pipeline import PairGenerator, PairGeneratorConfig
    from services.datagen.prompt_to_prompt import ALL_CROSS_ATTENTION
    from services.datagen.tiny_sd import build_tiny_stable_diffusion

    if args.full_size:
        kind, pipe = "SD 1.5 architecture, random weights", build_full_size_pipeline(args.device)
        steps, size = args.steps or 50, args.size or 512
    else:
        kind, pipe = "tiny random SD", build_tiny_stable_diffusion(seed=0)
        steps, size = args.steps or 20, args.size or 64
    config = PairGeneratorConfig(
        model="<bench>",
        device=args.device,
        num_inference_steps=steps,
        height=size,
        width=size,
        max_pairs_per_batch=args.batch_pairs,
        cross_attention_layers=ALL_CROSS_ATTENTION if args.cross_attention else None,
    )
    generator = PairGenerator(config, pipeline=pipe)
    info = generator.setup()
    sampling = PairSampling(pairs_per_row=args.pairs_per_row)
    rows = list(synthesize(args.image_rows + 1, args.seed))
    generator.generate_row(rows[0], pair_params_for_row(args.seed, 0, PairSampling(1)))  # warm-up

    print(
        f"image pairs ({kind}; {info.device} {info.dtype}; {size}x{size}, {steps} steps "
        f"{info.scheduler}; {args.pairs_per_row} pairs/row, <= {args.batch_pairs} per UNet "
        f"batch; cross-attention {'on' if args.cross_attention else 'off'}; "
        f"best of {args.repeat})"
    )
    header = ("rows", "pairs", "generate s", "pairs/s", "s/pair", "export s", "pairs/s")
    widths = (5, 6, 10, 8, 7, 8, 8)
    print(" | ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    generate = export = float("inf")
    for _ in range(args.repeat):
        pairs = []
        started = time.perf_counter()
        for row in rows[1:]:
            pairs += generator.generate_row(
                row, pair_params_for_row(args.seed, row.index, sampling)
            )
        generated = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            export_dataset(pairs, FileStorage(tmp), "bench")
        generate = min(generate, generated - started)
        export = min(export, time.perf_counter() - generated)
    count = len(pairs)
    cells = (args.image_rows, count, generate, count / generate, generate / count, export)
    cells += (count / export,)
    formats = ("d", "d", ".2f", ".2f", ".3f", ".2f", ".1f")
    print(" | ".join(f"{c:>{w}{f}}" for c, w, f in zip(cells, widths, formats, strict=True)))
    if args.jsonl:
        row = {
            "part": "datagen",
            "model": kind,
            "device": str(info.device),
            "dtype": str(info.dtype),
            "size": size,
            "steps": steps,
            "scheduler": str(info.scheduler),
            "rows": args.image_rows,
            "pairs": count,
            "generate_s": round(generate, 3),
            "pairs_per_s": round(count / generate, 3),
            "s_per_pair": round(generate / count, 4),
            "export_s": round(export, 3),
            "export_pairs_per_s": round(count / export, 2),
            "cross_attention": args.cross_attention,
        }
        with args.jsonl.open("a") as out:
            out.write(json.dumps(row) + "\n")


# flag -> (help, bench function).
PARTS: dict[str, tuple[str, Callable[[argparse.Namespace], None]]] = {
    "text": ("benchmark the text synthesizer", bench_text),
    "images": ("benchmark image pairs (SD + Prompt-to-Prompt) and their export", bench_images),
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
    images = parser.add_argument_group("images")
    images.add_argument("--image-rows", type=int, default=4, help="text rows to draw (default 4)")
    images.add_argument("--pairs-per-row", type=int, default=4, help="pairs per row (default 4)")
    images.add_argument(
        "--batch-pairs", type=int, default=4, help="pairs per UNet batch (default 4)"
    )
    images.add_argument("--steps", type=int, default=None, help="default: 20 tiny, 50 full size")
    images.add_argument("--size", type=int, default=None, help="default: 64 tiny, 512 full size")
    images.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    images.add_argument(
        "--cross-attention", action="store_true", help="also inject shared tokens' cross-attention"
    )
    images.add_argument(
        "--full-size",
        action="store_true",
        help="SD 1.5's architecture with random weights instead of the tiny model (use a GPU)",
    )
    parser.add_argument(
        "--jsonl", type=Path, help="also append the image figure here as a JSON line"
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
