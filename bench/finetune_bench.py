"""Peak GPU memory and images/s of fine-tuning, through the real trainer.

The full-size SD 1.5 InstructPix2Pix architecture (random weights, built from its configs:
bench/full_size.py) is saved once as a pipeline directory, a synthetic 512 px product edit
dataset is written in datagen's export layout, and `run_finetune` (the code behind
`python -m services.gpu_worker.finetune` and POST /v1/finetunes) trains each setting for a
few steps in a fresh process. Each row comes from the run's own metrics.jsonl: images/s
over the steps after the first (warm-up), and the peak of torch.cuda.max_memory_allocated.

    python bench/finetune_bench.py                       # the issue's settings, on CUDA
    python bench/finetune_bench.py --tiny --steps 3      # the mechanics, tiny model, CPU
    python bench/finetune_bench.py --only lora-b4-gc     # one setting

Targets on one GPU: LoRA at 512 px batch 4 within 12 GB; full fine-tuning at 512 px batch
1 within 24 GB. Rows print as JSON lines as each setting finishes (--jsonl appends them to
a file too); a setting that runs out of memory is a row with "error": "out_of_memory".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (mode, batch size, gradient checkpointing, 8-bit Adam)
SETTINGS = {
    "lora-b1-gc": ("lora", 1, True, True),
    "lora-b4-gc": ("lora", 4, True, True),
    "lora-b8-gc": ("lora", 8, True, True),
    "lora-b4-nogc": ("lora", 4, False, True),
    "lora-b4-gc-adamw": ("lora", 4, True, False),
    "full-b1-gc-8bit": ("full", 1, True, True),
    "full-b1-gc-adamw": ("full", 1, True, False),
    "full-b1-nogc-8bit": ("full", 1, False, True),
    "full-b4-gc-8bit": ("full", 4, True, True),
    "full-b4-nogc-8bit": ("full", 4, False, True),
}
TARGETS_GB = {"lora-b4-gc": 12.0, "full-b1-gc-8bit": 24.0}


def write_pipeline(directory: Path, tiny: bool) -> Path:
    """A pipeline directory the trainer loads like any other model."""
    if tiny:
        from services.gpu_worker.tiny_model import write_tiny_instruct_pix2pix

        return write_tiny_instruct_pix2pix(directory, seed=0)
    import torch

    from bench.engine_bench import build_full_size_pipeline

    pipe = build_full_size_pipeline(torch.device("cpu"))
    pipe.save_pretrained(directory)
    return directory


def write_dataset(directory: Path, size: int, rows: int) -> Path:
    """`rows` synthetic product pairs at size x size in datagen's export layout."""
    import numpy as np
    from PIL import Image

    from services.common.storage import FileStorage
    from services.datagen.dataset_export import DatasetWriter
    from services.datagen.pair_params import ImagePair

    rng = np.random.default_rng(0)
    pairs = []
    for index in range(rows):
        base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        source = Image.fromarray(base).resize((size, size), Image.BICUBIC)
        edited = Image.fromarray(255 - np.asarray(source))
        pairs.append(
            ImagePair(
                row_index=index,
                pair_index=0,
                category="apparel",
                edit_type="color_change",
                input_caption="a product photo",
                instruction="invert its colors",
                output_caption="a product photo, inverted",
                seed=index,
                p=0.5,
                text_guidance=7.5,
                num_inference_steps=2,
                injected_steps=1,
                denoising_steps=2,
                input_image=source,
                edited_image=edited,
            )
        )
    with DatasetWriter(FileStorage(directory), "") as writer:
        writer.add_many(pairs)
    return directory


def run_setting(name: str, model: Path, data: Path, steps: int, resolution: int) -> dict:
    """One setting in a process of its own (so each starts from an empty GPU)."""
    mode, batch, checkpointing, eight_bit = SETTINGS[name]
    config = {
        "mode": mode,
        "batch_size": batch,
        "gradient_checkpointing": checkpointing,
        "use_8bit_adam": eight_bit,
        "max_steps": steps,
        "resolution": resolution,
        "checkpoint_every": 1_000_000,
        "validation_every": 0,
        "holdout_rows": 0,
        "log_every": 1,
    }
    with tempfile.TemporaryDirectory() as dest:
        code = (
            "import json, sys\n"
            "from services.gpu_worker.finetune.config import FinetuneConfig\n"
            "from services.gpu_worker.finetune.train import run_finetune\n"
            "config = FinetuneConfig(**json.loads(sys.argv[1]))\n"
            "run_finetune(config, sys.argv[2], sys.argv[3], sys.argv[4])\n"
        )
        started = time.perf_counter()
        argv = [sys.executable, "-c", code, json.dumps(config), str(data), str(model), dest]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        row = {"setting": name, "mode": mode, "batch": batch, "resolution": resolution}
        row |= {"gradient_checkpointing": checkpointing, "adam_8bit": eight_bit}
        row["wall_s"] = round(time.perf_counter() - started, 1)
        metrics = Path(dest) / "metrics.jsonl"
        records = (
            [json.loads(line) for line in metrics.read_text().splitlines()]
            if (metrics.exists())
            else []
        )
    # What the trainer used: 8-bit AdamW needs CUDA and bitsandbytes (it logs a fallback).
    row["adam_8bit"] = eight_bit and "AdamW instead" not in proc.stderr and _cuda()
    if proc.returncode != 0:
        out_of_memory = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
        row["error"] = "out_of_memory" if out_of_memory else proc.stderr.strip()[-400:]
        return row
    timed = records[1:] or records
    row["steps"] = len(records)
    row["images_per_s"] = round(sum(r["images_per_s"] for r in timed) / len(timed), 3)
    row["peak_memory_gb"] = round(max(r["peak_memory_mb"] for r in records) / 1024, 2)
    target = TARGETS_GB.get(name)
    if target is not None:
        row["target_gb"] = target
        row["within_target"] = row["peak_memory_gb"] <= target
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU")
    parser.add_argument("--steps", type=int, default=6, help="steps per setting")
    parser.add_argument("--only", action="append", choices=sorted(SETTINGS))
    parser.add_argument("--jsonl", type=Path, help="also append each row to this file")
    args = parser.parse_args(argv)
    resolution = 64 if args.tiny else 512
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_pipeline(Path(tmp) / "model", args.tiny)
        data = write_dataset(Path(tmp) / "data", resolution, rows=16)
        for name in args.only or SETTINGS:
            row = run_setting(name, model, data, args.steps, resolution)
            row["device"] = "cpu (tiny)" if args.tiny else _device()
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with args.jsonl.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
    return rows


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
