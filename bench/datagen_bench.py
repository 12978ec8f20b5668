"""Throughput of the dataset generator's stages.

    python bench/datagen_bench.py                    # every part (text, images)
    python bench/datagen_bench.py --text --rows 3000 100000 --repeat 3
    python bench/datagen_bench.py --images           # tiny random SD on the CPU
    python bench/datagen_bench.py --images --full-size --image-rows 8   # on a GPU
    python bench/datagen_bench.py --recipe --device cuda --jsonl out.jsonl  # kept pairs/min
    python bench/datagen_bench.py --recipe --tiny --image-rows 1 --new-steps 4 --old-steps 2
    python bench/datagen_bench.py --audit --audit-seeds 0 1 2

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


# -- InstructPix2Pix's recipe against the old defaults -------------------------------------------

# name -> (candidates per row, filter, steps, sampler (None: the model's own), batch size).
RECIPES = {
    # The dataset spec's defaults: InstructPix2Pix's generate_img_dataset.py.
    "new": {"filter": True, "steps": 100, "scheduler": "euler_ancestral"},
    # Before: 4 pairs per row, all kept, 50 steps of the checkpoint's PNDM, 4 per batch.
    "old": {"filter": False, "steps": 50, "scheduler": None},
}


def assumed_pass(seed: int, row: int, candidate: int, rate: float) -> bool:
    """A deterministic draw standing in for the CLIP filter's verdict: random weights make
    CLIP scores meaningless, so the pass rate is assumed (``--assume-pass-rate``)."""
    import hashlib

    key = f"bench-pass:{seed}:{row}:{candidate}".encode()
    draw = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return draw < rate


def build_full_size_clip_vision(device: str):
    """CLIP ViT-L/14's image tower with random weights (what the filter runs per picture)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from services.common.diffusion import resolve_device, serving_dtype

    target = resolve_device(device)
    config = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        projection_dim=768,
    )
    torch.manual_seed(0)
    with torch.device(target):
        model = CLIPVisionModelWithProjection(config)
    return model.to(dtype=serving_dtype(target)).eval()


def _clip_cost(model, pairs) -> None:
    """Run the filter's image encoder over a batch's pictures (its cost; scores unused)."""
    import numpy as np
    import torch

    images = [image for pair in pairs for image in (pair.input_image, pair.edited_image)]
    pixels = np.stack([np.asarray(image.convert("RGB").resize((224, 224))) for image in images])
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    param = next(model.parameters())
    with torch.inference_mode():
        model(pixel_values=batch.to(device=param.device, dtype=param.dtype))


def bench_recipe(args: argparse.Namespace) -> None:
    """Kept pairs per GPU-minute: InstructPix2Pix's recipe (100 candidates, CLIP filter,
    100 Euler ancestral steps, early stop at pairs_per_row) against the old defaults (4
    pairs, no filter, 50 PNDM steps), the filter's verdict drawn at an assumed pass rate."""
    import torch

    from services.common.diffusion import resolve_device
    from services.datagen.pair_params import PairSampling, pair_params_for_row
    from services.datagen.pair_pipeline import PairGenerator, PairGeneratorConfig
    from services.datagen.tiny_sd import build_tiny_stable_diffusion

    device = resolve_device(args.device)
    tiny = args.tiny or device.type != "cuda"
    if tiny:
        kind, pipe = "tiny random SD", build_tiny_stable_diffusion(seed=0)
        size = args.size or 32
        clip = None
    else:
        kind, pipe = "SD 1.5 architecture, random weights", build_full_size_pipeline(args.device)
        size = args.size or 512
        clip = build_full_size_clip_vision(args.device)
    generator = PairGenerator(
        PairGeneratorConfig(model="<bench>", device=args.device, height=size, width=size),
        pipeline=pipe,
    )
    info = generator.setup()
    rows = list(synthesize(args.image_rows + 1, args.seed))
    pairs_per_row = args.pairs_per_row
    # Warm-up (kernels, allocator) on a row not timed, with each recipe's sampler.
    for recipe in RECIPES.values():
        generator.generate_row(
            rows[0],
            pair_params_for_row(args.seed, 0, PairSampling(1)),
            num_inference_steps=2,
            scheduler=recipe["scheduler"],
        )

    print(
        f"kept pairs per GPU-minute ({kind}; {info.device} {info.dtype}; {size}x{size}; "
        f"{args.image_rows} rows; keep {pairs_per_row}/row; filter verdict ASSUMED: a "
        f"deterministic draw passing {args.assume_pass_rate:.0%} of candidates, since random "
        f"weights make CLIP scores meaningless; "
        f"{'CLIP ViT-L/14 image tower run for its cost' if clip else 'no CLIP cost (tiny)'})"
    )
    header = ("recipe", "cand/row", "steps", "sampler", "batch", "made", "kept", "s", "kept/min")
    widths = (6, 8, 5, 15, 5, 6, 5, 8, 9)
    print(" | ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    figures = {}
    for name in args.recipes:
        recipe = RECIPES[name]
        candidates = args.candidates if recipe["filter"] else pairs_per_row
        batch = args.candidate_batch_size if recipe["filter"] else 4
        steps = args.new_steps if name == "new" else args.old_steps
        sampling = PairSampling(pairs_per_row, candidates_per_row=candidates)

        def judge(pairs, rate=args.assume_pass_rate):
            if clip is not None:
                _clip_cost(clip, pairs)
            return pairs, [assumed_pass(args.seed, p.row_index, p.pair_index, rate) for p in pairs]

        made = kept = 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for row in rows[1:]:
            result = generator.generate_candidates(
                row,
                pair_params_for_row(args.seed, row.index, sampling),
                judge if recipe["filter"] else None,
                keep=pairs_per_row,
                num_inference_steps=steps,
                scheduler=recipe["scheduler"],
                batch_size=batch,
            )
            made += len(result.generated)
            kept += len(result.kept)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        per_minute = kept / (elapsed / 60) if elapsed else float("inf")
        sampler = recipe["scheduler"] or info.scheduler.removesuffix("Scheduler")
        cells = (name, candidates, steps, sampler, batch, made, kept, elapsed, per_minute)
        formats = ("", "d", "d", "", "d", "d", "d", ".2f", ".1f")
        print(" | ".join(f"{c:>{w}{f}}" for c, w, f in zip(cells, widths, formats, strict=True)))
        figures[name] = per_minute
        if args.jsonl:
            line = {
                "part": "datagen_recipe",
                "recipe": name,
                "model": kind,
                "device": str(info.device),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "dtype": str(info.dtype),
                "size": size,
                "rows": args.image_rows,
                "pairs_per_row": pairs_per_row,
                "candidates_per_row": candidates,
                "candidate_batch_size": batch,
                "filter": recipe["filter"],
                "assumed_pass_rate": args.assume_pass_rate if recipe["filter"] else None,
                "clip_cost_included": clip is not None and recipe["filter"],
                "steps": steps,
                "scheduler": sampler,
                "candidates_made": made,
                "pairs_kept": kept,
                "seconds": round(elapsed, 3),
                "kept_pairs_per_minute": round(per_minute, 3),
            }
            with args.jsonl.open("a") as out:
                out.write(json.dumps(line) + "\n")
    if {"new", "old"} <= figures.keys() and figures["new"]:
        print(f"time per kept pair, new recipe / old: {figures['old'] / figures['new']:.1f}x")


def bench_audit(args: argparse.Namespace) -> None:
    """The audit's counts (services.datagen.audit) for the bundled catalog's rows."""
    from services.datagen.audit import audit_rows

    print(f"audit of the bundled catalog's rows ({args.audit_rows} rows per seed)")
    for seed in args.audit_seeds:
        report = audit_rows(synthesize(args.audit_rows, seed))
        counts = report.counts()
        print(
            f"seed {seed}: {report.rows} rows, " + ", ".join(f"{k} {v}" for k, v in counts.items())
        )
        if args.jsonl:
            line = {"part": "datagen_audit", "seed": seed, "rows": report.rows, "counts": counts}
            with args.jsonl.open("a") as out:
                out.write(json.dumps(line) + "\n")


# flag -> (help, bench function).
PARTS: dict[str, tuple[str, Callable[[argparse.Namespace], None]]] = {
    "text": ("benchmark the text synthesizer", bench_text),
    "images": ("benchmark image pairs (SD + Prompt-to-Prompt) and their export", bench_images),
    "recipe": (
        "kept pairs per GPU-minute: InstructPix2Pix's recipe against the old defaults",
        bench_recipe,
    ),
    "audit": ("the audit's counts for the bundled catalog's rows", bench_audit),
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
    images.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default auto)"
    )
    images.add_argument(
        "--cross-attention", action="store_true", help="also inject shared tokens' cross-attention"
    )
    images.add_argument(
        "--full-size",
        action="store_true",
        help="SD 1.5's architecture with random weights instead of the tiny model (use a GPU)",
    )
    recipe = parser.add_argument_group("recipe (uses --image-rows, --pairs-per-row, --size)")
    recipe.add_argument(
        "--tiny", action="store_true", help="the tiny random SD (the default off CUDA)"
    )
    recipe.add_argument(
        "--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES), help="(both)"
    )
    recipe.add_argument("--candidates", type=int, default=100, help="new recipe (default 100)")
    recipe.add_argument(
        "--candidate-batch-size", type=int, default=8, help="new recipe (default 8)"
    )
    recipe.add_argument("--new-steps", type=int, default=100, help="(default 100)")
    recipe.add_argument("--old-steps", type=int, default=50, help="(default 50)")
    recipe.add_argument(
        "--assume-pass-rate",
        type=float,
        default=0.1,
        help="share of candidates the filter is assumed to pass (default 0.1)",
    )
    audit = parser.add_argument_group("audit")
    audit.add_argument("--audit-rows", type=int, default=3000, help="rows per seed (3000)")
    audit.add_argument("--audit-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jsonl", type=Path, help="also append the figures here as JSON lines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="runs per size; best is kept")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # By default every part but the recipe (minutes of 100-step candidates).
    chosen = [name for name in PARTS if getattr(args, name)] or ["text", "images", "audit"]
    for index, name in enumerate(chosen):
        if index:
            print()
        PARTS[name][1](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
