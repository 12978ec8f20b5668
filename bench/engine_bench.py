"""Edit engine benchmark: stock diffusers against our engine, on the same device.

    python bench/engine_bench.py                 # full-size, random weights, needs a GPU
    python bench/engine_bench.py --tiny          # tiny model on CPU: a smoke run, not timed

Full size means the real InstructPix2Pix architecture built from its configs with random
weights (SD1.5 UNet with 8 input channels, CLIP ViT-L/14 text encoder, SD VAE): the same
compute as the released model, no download. 512x512, 20 steps, Euler ancestral.

Per configuration it prints ms per edit, edits/s, peak GPU memory and MFU:
44.2 TFLOP per edit / time per edit / the device's peak, where the peak is measured in the
same run with a large fp16 matmul.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.edit_params import EditParams  # noqa: E402
from services.common.tiny_components import build_euler_ancestral_scheduler  # noqa: E402
from services.gpu_worker.engine import EditEngine, EditRequest, EngineOptions  # noqa: E402

# Measured for the full-size model at 512x512 (DEVELOPERS.md): UNet 677 GFLOP per sample per
# forward, three guidance branches per step; VAE 1.08 TFLOP encode, 2.48 TFLOP decode.
UNET_TFLOP_PER_SAMPLE = 0.677
VAE_TFLOP = 1.08 + 2.48


def edit_tflop(steps: int) -> float:
    return 3 * UNET_TFLOP_PER_SAMPLE * steps + VAE_TFLOP


@dataclass
class Result:
    config: str
    batch: int
    ms_per_edit: float
    edits_per_s: float
    latency_ms: float
    peak_mem_gb: float | None
    mfu: float | None


def build_full_size_pipeline(device: torch.device):
    """InstructPix2Pix at full size with random weights (bench/full_size.py)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from bench.full_size import full_size_components

    return StableDiffusionInstructPix2PixPipeline(
        **full_size_components(8, device),
        scheduler=build_euler_ancestral_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_pipeline():
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from services.gpu_worker.tiny_model import write_tiny_instruct_pix2pix

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_instruct_pix2pix(tmp)
        return StableDiffusionInstructPix2PixPipeline.from_pretrained(tmp)


def measure_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    iters = 50
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def params_for(i: int, steps: int) -> EditParams:
    prompts = ["make it red", "print a spiderman logo on it", "put the ball on sand"]
    return EditParams(prompt=prompts[i % 3], seed=i, num_inference_steps=steps)


def bench_stock(pipe, image, steps, rounds, device) -> list[float]:
    """Stock diffusers: StableDiffusionInstructPix2PixPipeline.__call__, one at a time."""
    times = []
    for i in range(rounds):
        p = params_for(i, steps)
        _sync(device)
        start = time.perf_counter()
        pipe(
            p.prompt,
            image=image,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(p.seed),
        )
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def bench_engine(engine, image, steps, batch, rounds, device) -> list[float]:
    times = []
    for r in range(rounds):
        requests = [EditRequest(image, params_for(r * batch + i, steps)) for i in range(batch)]
        _sync(device)
        start = time.perf_counter()
        engine.predict_batch(requests)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def summarize(config, batch, times, steps, device, peak_tflops) -> Result:
    per_batch = statistics.median(times)
    per_edit = per_batch / batch
    mfu = edit_tflop(steps) / per_edit / peak_tflops if peak_tflops else None
    return Result(
        config=config,
        batch=batch,
        ms_per_edit=per_edit * 1000,
        edits_per_s=1 / per_edit,
        latency_ms=per_batch * 1000,
        peak_mem_gb=_peak_gb(device),
        mfu=mfu,
    )


def run(args) -> tuple[list[Result], dict]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    side = args.size
    image = Image.new("RGB", (side, side), (90, 60, 200))
    peak = measure_peak_tflops(device)
    results: list[Result] = []

    def pipeline():
        return build_tiny_pipeline() if args.tiny else build_full_size_pipeline(device)

    # Stock: the pipeline as diffusers ships it, fp16, default attention processors.
    pipe = pipeline().to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    bench_stock(pipe, image, args.steps, 1, device)  # warm-up
    _reset_peak(device)
    times = bench_stock(pipe, image, args.steps, args.rounds, device)
    results.append(summarize("stock diffusers", 1, times, args.steps, device, peak))
    del pipe
    _reset_peak(device)

    for compile_unet in args.compile:
        engine = EditEngine(
            "random-weights",
            EngineOptions(
                device=device.type,
                max_batch=max(args.batches),
                compile_unet=compile_unet,
                compile_mode=args.compile_mode,
            ),
        )
        engine.use_pipeline(pipeline())
        for batch in args.batches:
            bench_engine(engine, image, args.steps, batch, 1, device)  # warm-up / compile
            _reset_peak(device)
            times = bench_engine(engine, image, args.steps, batch, args.rounds, device)
            label = "ours" + (f" + compile ({args.compile_mode})" if engine.info.compiled else "")
            results.append(summarize(label, batch, times, args.steps, device, peak))
        del engine
        _reset_peak(device)

    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "size": side,
        "steps": args.steps,
        "compile_mode": args.compile_mode,
        "peak_tflops_fp16_matmul": peak,
        "model": "tiny" if args.tiny else "full-size InstructPix2Pix, random weights",
    }
    return results, meta


def table(results: list[Result]) -> str:
    lines = [
        "| config | batch | ms/edit | edits/s | batch latency ms | peak GB | MFU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        peak = f"{r.peak_mem_gb:.2f}" if r.peak_mem_gb is not None else "n/a"
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        lines.append(
            f"| {r.config} | {r.batch} | {r.ms_per_edit:.1f} | {r.edits_per_s:.2f} | "
            f"{r.latency_ms:.1f} | {peak} | {mfu} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke run)")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument(
        "--compile",
        type=lambda v: v == "on",
        nargs="+",
        default=None,
        help="torch.compile settings to run: on off",
    )
    parser.add_argument(
        "--compile-mode",
        default=EngineOptions.model_fields["compile_mode"].default,
        choices=["default", "reduce-overhead", "max-autotune"],
        help="torch.compile mode when compiling (default: the engine's)",
    )
    parser.add_argument("--json", type=Path, help="also write results here")
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 512)
    args.rounds = args.rounds or (1 if args.tiny else 5)
    if args.compile is None:
        args.compile = [False] if args.tiny else [False, True]
    results, meta = run(args)
    print(json.dumps(meta))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}))
    return results


if __name__ == "__main__":
    main()
