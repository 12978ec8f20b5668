"""Wall time of one edit, photo in to encoded output out, and what the full-resolution
path adds to the model's time.

    python -m bench.edit_wall_time --tiny                # CPU, the tiny model (tests' budget)
    python -m bench.edit_wall_time                       # CUDA: full-size SD 1.5 InstructPix2Pix
                                                         # with random weights (real compute)

For each photo (1024x1024 and 2048x1365, a textured JPEG) this runs the worker's own steps
(services/gpu_worker/edit_job.py) one after another and times each, as the median of
--runs after a warm-up:

- prepare_ms: decode the JPEG, orient and convert to sRGB (`prepare_input`), resize to
  the bucket (Pillow LANCZOS);
- model_ms: the edit at the bucket, --steps steps with three-branch guidance;
- full_res_ms: `to_output` at the photo's size (detail-preserving upscaling) on the
  engine's device, and full_res_masked_ms with a left-half mask;
- encode_png_ms / encode_jpeg_ms: `encode_output` of the full-size result;
- extra_pct: full_res_ms as a share of model_ms (the issue's target: under 10% on an
  H100 at 2048 px). Encoding is reported apart: it is CPU work the GPU need not wait for.

One JSON line per photo on stdout, written as each is measured.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.edit_params import EditParams
from services.common.images import decode_image, encode_output, prepare_input
from services.gpu_worker.engine import EditEngine, EngineOptions
from services.gpu_worker.full_resolution import to_output

PHOTOS = [(1024, 1024), (2048, 1365)]


def textured_jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC), dtype=int)
    image = np.clip(image + rng.integers(-24, 24, image.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def median_ms(fn: Callable[[], object], runs: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 1)


def load_engine(tiny: bool) -> EditEngine:
    if tiny:
        from services.gpu_worker.tiny_model import write_tiny_instruct_pix2pix

        directory = write_tiny_instruct_pix2pix(Path(tempfile.mkdtemp()) / "tiny")
        engine = EditEngine(str(directory), EngineOptions(device="cpu"))
        engine.setup()
        return engine
    from bench.engine_bench import build_full_size_pipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine = EditEngine("random-weights", EngineOptions(device=device.type))
    engine.use_pipeline(build_full_size_pipeline(device))
    return engine


def bench_photo(engine: EditEngine, size, steps: int, runs: int) -> dict:
    device = engine.device
    data = textured_jpeg(size)
    original = prepare_input(decode_image(data).image)
    bucket = engine.bucket_for(*original.size)
    model_input = original.resize(bucket, Image.Resampling.LANCZOS)
    mask = Image.new("L", original.size, 0)
    mask.paste(255, (0, 0, original.width // 2, original.height))
    params = EditParams(prompt="make the background white", num_inference_steps=steps, seed=0)
    (edited,) = engine.predict(model_input, params)
    full = to_output(original, model_input, edited, original.size, None, 8, device)

    def prepare():
        image = prepare_input(decode_image(data).image)
        return image.resize(bucket, Image.Resampling.LANCZOS)

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": "full-size sd15" if engine.model_path == "random-weights" else "tiny",
        "photo": f"{size[0]}x{size[1]}",
        "bucket": f"{bucket[0]}x{bucket[1]}",
        "steps": steps,
        "prepare_ms": median_ms(prepare, runs, device),
        "model_ms": median_ms(lambda: engine.predict(model_input, params), runs, device),
        "full_res_ms": median_ms(
            lambda: to_output(original, model_input, edited, original.size, None, 8, device),
            runs,
            device,
        ),
        "full_res_masked_ms": median_ms(
            lambda: to_output(original, model_input, edited, original.size, mask, 8, device),
            runs,
            device,
        ),
        "encode_png_ms": median_ms(lambda: encode_output(full, "png", 90), runs, device),
        "encode_jpeg_ms": median_ms(lambda: encode_output(full, "jpeg", 90), runs, device),
    }
    result["extra_pct"] = round(100 * result["full_res_ms"] / result["model_ms"], 1)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    engine = load_engine(args.tiny)
    results = []
    for size in PHOTOS:
        result = bench_photo(engine, size, args.steps, args.runs)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
