#!/usr/bin/env bash
# Every GPU figure docs/PERFORMANCE.md asks for, in one run on a machine with one GPU:
# the engine benchmark (stock diffusers vs ours at batch 1/4/8, torch.compile off and on)
# and the full-size datagen benchmark. Written for a lent GPU machine whose image has torch
# and transformers but not diffusers: `make gpu-wheels` here puts what it lacks in .whl/,
# and this script installs those first (with --no-deps, so the image's torch stays).
#
#   bash bench/gpu_session.sh            # results in $OUT (default var/gpu_session)
#
# Each part has its own time limit and its output is kept even when a part fails, so one
# run always brings back whatever it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-var/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
ENGINE_TIMEOUT_S=${ENGINE_TIMEOUT_S:-330}
DATAGEN_TIMEOUT_S=${DATAGEN_TIMEOUT_S:-120}
FULL_RES_TIMEOUT_S=${FULL_RES_TIMEOUT_S:-150}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/instructedit-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/instructedit-site${PYTHONPATH:+:$PYTHONPATH}
fi

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__, "transformers", transformers.__version__)'
    "$PYTHON" -c 'import xformers; print("xformers", xformers.__version__)' 2>/dev/null ||
        echo "xformers: not installed (the engine uses PyTorch SDPA)"
} 2>&1 | tee "$OUT/device.txt"
"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"' || exit 1

status=0
timeout "$ENGINE_TIMEOUT_S" "$PYTHON" bench/engine_bench.py --compile off on \
    --compile-mode reduce-overhead --json "$OUT/engine.json" 2>&1 | tee "$OUT/engine.log" ||
    status=1
# The full-resolution path (detail-preserving upscaling, mask composite) on the GPU, and
# a whole edit at 1024x1024 and 2048x1365 with its share of the model's time.
timeout "$FULL_RES_TIMEOUT_S" "$PYTHON" bench/full_resolution_bench.py --device cuda \
    --runs 20 2>&1 | tee "$OUT/full_resolution.jsonl" || status=1
timeout "$FULL_RES_TIMEOUT_S" "$PYTHON" bench/edit_wall_time.py --runs 5 2>&1 |
    tee "$OUT/edit_wall_time.jsonl" || status=1
timeout "$DATAGEN_TIMEOUT_S" "$PYTHON" bench/datagen_bench.py --images --full-size \
    --device cuda 2>&1 | tee "$OUT/datagen.log" || status=1
exit $status
