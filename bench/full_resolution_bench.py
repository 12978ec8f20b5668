"""Cost of bringing an edit back to the photo's size (services/gpu_worker/full_resolution.py).

    python -m bench.full_resolution_bench                      # CUDA if available, else CPU
    python -m bench.full_resolution_bench --device cpu --runs 5

For each photo size (1024x1024, 2048x1365) and model resolution (512: SD 1.5, 768: SDXL)
the photo runs at its bucket (services/common/buckets.py) and this times, as the median
of --runs after a warm-up, on --device:

- ms: `to_output` at the photo's size, no mask (PIL images in, a PIL image out);
- ms_masked: the same with a left-half mask, feathered by --feather px;
- its parts on tensors already on the device: resize_ms (the edit and the model input up
  to the photo's size, bicubic), detail_weight_ms (the change weight at the bucket, then
  up to the photo's size), composite_ms (feathered alpha and the mask composite);
- pillow_resize_ms: for scale, a plain Pillow LANCZOS resize of the edit to the photo's
  size (what the worker did before; one CPU core).

One JSON line per case on stdout; nothing is written anywhere else.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Runnable as a plain script from anywhere: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.buckets import bucket_for
from services.gpu_worker.full_resolution import (
    change_weight,
    composite,
    feather_alpha,
    resize,
    to_output,
    upscale_with_detail,
)

INPUTS = [(1024, 1024), (2048, 1365)]
RESOLUTIONS = [512, 768]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], runs: int, device: torch.device) -> float:
    """Median wall time of `fn` in ms, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 2)


def case_images(size: tuple[int, int], bucket: tuple[int, int], seed: int = 0):
    """A textured photo, what the model saw, and an edit of it (left third recoloured,
    +-3 levels of noise): the timings do not depend on the content, the weights a little."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    original = Image.fromarray(pixels)
    model_input = original.resize(bucket, Image.Resampling.LANCZOS)
    edit = np.asarray(model_input).astype(np.int16)
    edit[:, : bucket[0] // 3] = edit[:, : bucket[0] // 3][..., [2, 0, 1]]
    edit += rng.integers(-3, 4, edit.shape, dtype=np.int16)
    edited = Image.fromarray(np.clip(edit, 0, 255).astype(np.uint8))
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, width // 2, height))
    return original, model_input, edited, mask


def on_device(image: Image.Image, device: torch.device) -> torch.Tensor:
    """uint8 (1, C, H, W), as to_output holds its images."""
    pixels = torch.from_numpy(np.array(image)).to(device)
    return pixels.permute(2, 0, 1)[None] if pixels.ndim == 3 else pixels[None, None]


@torch.inference_mode()
def bench_case(size, resolution, device: torch.device, runs: int, feather: int) -> dict:
    bucket = bucket_for(*size, resolution)
    original, model_input, edited, mask = case_images(size, bucket)

    def full(with_mask: bool) -> Callable[[], object]:
        return lambda: to_output(
            original,
            model_input,
            edited,
            size,
            mask if with_mask else None,
            feather,
            device=device,
        )

    reference = on_device(original, device)
    seen, out = on_device(model_input, device), on_device(edited, device)
    seen_f, out_f = seen.float(), out.float()
    hw = reference.shape[-2:]
    result = upscale_with_detail(reference, seen, out)
    mask_t = on_device(mask, device) >= 128
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "input": f"{size[0]}x{size[1]}",
        "bucket": f"{bucket[0]}x{bucket[1]}",
        "ms": median_ms(full(False), runs, device),
        "ms_masked": median_ms(full(True), runs, device),
        "resize_ms": median_ms(lambda: (resize(out_f, hw), resize(seen_f, hw)), runs, device),
        "detail_weight_ms": median_ms(
            lambda: resize(change_weight(seen_f, out_f), hw, "bilinear"), runs, device
        ),
        "composite_ms": median_ms(
            lambda: composite(result, reference, feather_alpha(mask_t, feather)), runs, device
        ),
        "pillow_resize_ms": median_ms(
            lambda: edited.resize(size, Image.Resampling.LANCZOS), runs, device
        ),
        "feather": feather,
        "runs": runs,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--feather", type=int, default=8, help="mask feather in px")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = []
    for size in INPUTS:
        for resolution in RESOLUTIONS:
            results.append(bench_case(size, resolution, device, args.runs, args.feather))
            print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
