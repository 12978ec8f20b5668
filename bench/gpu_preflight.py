"""Pre-flight of the GPU kit (bench/gpu_session.sh): fail in seconds, saying why, when the
machine cannot run the benchmarks, instead of minutes into the first part.

    python bench/gpu_preflight.py               # exit 1 unless everything below holds
    python bench/gpu_preflight.py --allow-cpu   # the same without a GPU (trying the kit)

Checks, in order: torch, diffusers and transformers import; the project's engine
(services.gpu_worker.engine) imports; torch.cuda.is_available(); a small matmul on the GPU
gives the CPU's answer. Prints one JSON line: the versions, the device, the engine's
options (whether `sync_debug` and `attention` exist yet) and `ok`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WHEELS_HINT = (
    "the kit carries what the GPU image lacks as wheels: run `make gpu-wheels` here and "
    'name ".whl" in the device call\'s carry'
)


class PreflightError(Exception):
    pass


def _import(name: str, hint: str = ""):
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise PreflightError(
            f"{name} does not import: {type(exc).__name__}: {exc}" + (f" ({hint})" if hint else "")
        ) from exc


def check(row: dict, allow_cpu: bool) -> None:
    """Fill `row` with what was found, raising PreflightError at the first failure."""
    row["python"] = sys.version.split()[0]
    torch = _import("torch")
    row["torch"] = torch.__version__
    row["torch_cuda"] = torch.version.cuda
    row["diffusers"] = _import("diffusers", WHEELS_HINT).__version__
    row["transformers"] = _import("transformers").__version__
    engine = _import("services.gpu_worker.engine", WHEELS_HINT)
    fields = sorted(engine.EngineOptions.model_fields)
    row["engine_options"] = fields
    row["sync_debug_option"] = "sync_debug" in fields
    row["attention_option"] = "attention" in fields
    try:
        importlib.import_module("xformers")
        row["xformers"] = True
    except Exception:
        row["xformers"] = False
    if not torch.cuda.is_available():
        if not allow_cpu:
            raise PreflightError(
                f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}); is this the GPU machine?"
            )
        device = torch.device("cpu")
        row["device"] = "cpu"
    else:
        device = torch.device("cuda")
        props = torch.cuda.get_device_properties(device)
        row["device"] = props.name
        row["capability"] = f"{props.major}.{props.minor}"
        row["memory_gb"] = round(props.total_memory / 2**30, 1)
    generator = torch.Generator("cpu").manual_seed(0)
    a = torch.randn(256, 256, generator=generator)
    b = torch.randn(256, 256, generator=generator)
    got = (a.to(device) @ b.to(device)).cpu()
    want = a @ b
    # Loose enough for TF32 matmuls, tight enough to catch a broken device.
    if not torch.allclose(got, want, rtol=2e-2, atol=2e-1):
        err = (got - want).abs().max().item()
        raise PreflightError(f"a 256x256 matmul on {device} is wrong (max error {err})")
    row["matmul_ok"] = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allow-cpu", action="store_true", help="pass without a GPU")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    row: dict = {"part": "preflight", "ok": False}
    try:
        check(row, args.allow_cpu)
        row["ok"] = True
    except PreflightError as exc:
        row["error"] = str(exc)
        print(f"PRE-FLIGHT FAILED: {exc}", file=sys.stderr, flush=True)
    row["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(row), flush=True)
    return 0 if row["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
