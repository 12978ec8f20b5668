#!/usr/bin/env bash
# Every GPU figure docs/PERFORMANCE.md asks for, in one device call (timeout_s 590) on a
# machine with one GPU, written so that the call cannot come back empty. Made for a lent
# GPU machine whose image has torch and transformers but not diffusers: `make gpu-wheels`
# here puts what it lacks in .whl/, and this script installs those first (--no-deps, so
# the image's torch stays).
#
#   bash bench/gpu_session.sh                 # results in $OUT (default var/gpu_session)
#   KIT_TINY=1 bash bench/gpu_session.sh      # the same parts with tiny models on CPU
#
# 1. setup: install the carried wheels; device.txt (date, nvidia-smi, Python).
# 2. pre-flight (bench/gpu_preflight.py): imports of torch, diffusers, transformers and the
#    engine, CUDA, a small matmul on the GPU. Fails in seconds, and then nothing else runs.
# 3. the parts, most valuable first, each a process of its own under its own `timeout`:
#    stock-eager   stock diffusers, then our engine without compile, batch 1/4/8
#    compiled      our engine, torch.compile reduce-overhead, batch 1/8/4: first-call
#                  (compile) time, graphs, recompiles after warm-up
#    sync-debug    the engine's sync_debug pass (no host-device sync in the loop?), batch
#                  1 and 8, and a census of where syncs happen
#    schedulers    batch 1: 20-step Euler ancestral next to 10-step DPM-Solver++ 2M
#    full-res      bench/full_resolution_bench.py on the GPU
#    edit-wall     bench/edit_wall_time.py, full-size model
#    datagen       bench/datagen_bench.py --images --full-size
#
# Every part writes its rows as JSON lines the moment each is measured: the engine parts
# to engine.jsonl (bench/engine_bench.py --jsonl, flushed per row), the others' JSON stdout
# to full_resolution.jsonl, edit_wall_time.jsonl, datagen.jsonl. kit.jsonl gets one line
# per step (status ok / failed / timeout / skipped, rc, seconds, limit, rows); kit.log
# everything printed. A part killed by its timeout keeps the rows it wrote. Seven files in
# all: the device call brings back at most 8.
#
# Time limits (s): the parts' limits below add up to 490, plus setup (~20 s, at most
# SETUP_TIMEOUT_S) stays inside the call's 590 s; KIT_BUDGET_S is a deadline for the whole
# script besides: a part never gets more than what is left of it (tests/bench checks both).
# Run it as: device `run` with carry [".whl"], timeout_s 590, command
# `bash bench/gpu_session.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-var/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
KIT_TINY=${KIT_TINY:-0}
LOG="$OUT/kit.log"
KIT_JSONL="$OUT/kit.jsonl"
ENGINE_JSONL="$OUT/engine.jsonl"

# Limits in seconds; each part's expected time on an H100/H200 in brackets (imports ~10-15 s
# and building the full-size model from its configs ~5-10 s are in every part but the
# pre-flight). Parts: 490 in all; with setup, at most 550.
KIT_BUDGET_S=${KIT_BUDGET_S:-575}                   # deadline for the whole script
# The carried wheels (`make gpu-wheels`); the tests point it at an empty directory.
WHEELS=${WHEELS:-.whl}
SETUP_TIMEOUT_S=${SETUP_TIMEOUT_S:-60}              # pip install of .whl (~10-20)
PREFLIGHT_TIMEOUT_S=${PREFLIGHT_TIMEOUT_S:-30}      # imports, CUDA, a matmul (~10)
STOCK_EAGER_TIMEOUT_S=${STOCK_EAGER_TIMEOUT_S:-80}  # stock x5, ours 1/4/8 x6 (~40)
COMPILED_TIMEOUT_S=${COMPILED_TIMEOUT_S:-180}       # inductor compiles, graphs (~60-150)
SYNC_DEBUG_TIMEOUT_S=${SYNC_DEBUG_TIMEOUT_S:-45}    # 4-step runs, census at 4 and 8 (~30)
SCHEDULERS_TIMEOUT_S=${SCHEDULERS_TIMEOUT_S:-35}    # batch 1, two samplers x6 (~25)
FULL_RES_TIMEOUT_S=${FULL_RES_TIMEOUT_S:-25}        # no model, torch only (~10)
EDIT_WALL_TIMEOUT_S=${EDIT_WALL_TIMEOUT_S:-45}      # full-size engine, 2 photos (~35)
DATAGEN_TIMEOUT_S=${DATAGEN_TIMEOUT_S:-50}          # SD 1.5 + Prompt-to-Prompt (~35)

KIT_START=$SECONDS
status=0

# Pass stdin on, appending its JSON lines (those starting with "{") to file $1 as each comes.
keep_json() {
    local line
    while IFS= read -r line || [[ -n $line ]]; do
        printf '%s\n' "$line"
        if [[ -n $1 && $line == "{"* ]]; then printf '%s\n' "$line" >>"$1"; fi
    done
    return 0
}

lines() { if [[ -f $1 ]]; then wc -l <"$1"; else echo 0; fi; }

# run_part NAME CAP ROWS SOURCE CMD...: CMD under `timeout` (CAP seconds, or what is left
# of KIT_BUDGET_S), its output to the console and kit.log. ROWS is the part's JSON lines
# file: SOURCE "self" when CMD writes it (--jsonl), "stdout" when its JSON lines are taken
# from CMD's output. One line in kit.jsonl says how it went.
run_part() {
    local name=$1 cap=$2 rows=$3 source=$4
    shift 4
    local left=$((KIT_BUDGET_S - (SECONDS - KIT_START) - 5))
    local limit=$((cap < left ? cap : left))
    local before start rc state
    before=$(lines "$rows")
    if ((left < 5)); then
        echo "== $name: skipped, ${left}s left of the kit's ${KIT_BUDGET_S}s" | tee -a "$LOG"
        printf '{"part": "%s", "status": "skipped", "rc": null, "seconds": 0, "limit_s": %d, "rows": 0}\n' \
            "$name" "$limit" >>"$KIT_JSONL"
        status=1
        return 1
    fi
    echo "== $name (limit ${limit}s, $((SECONDS - KIT_START))s into the kit): $*" | tee -a "$LOG"
    start=$SECONDS
    if [[ $source == stdout ]]; then
        timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG" | keep_json "$rows"
    else
        timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    fi
    rc=$?
    case $rc in
        0) state=ok ;;
        124 | 137) state=timeout ;;
        *) state=failed ;;
    esac
    printf '{"part": "%s", "status": "%s", "rc": %d, "seconds": %d, "limit_s": %d, "rows": %d}\n' \
        "$name" "$state" "$rc" "$((SECONDS - start))" "$limit" "$(($(lines "$rows") - before))" |
        tee -a "$LOG" >>"$KIT_JSONL"
    ((rc == 0)) || status=1
    return "$rc"
}

# -- 1. setup ------------------------------------------------------------------------------
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "== setup: installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels" | tee -a "$LOG"
    timeout "$SETUP_TIMEOUT_S" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/instructedit-site "$WHEELS"/*.whl 2>&1 | tee -a "$LOG"
    rc=$?
    printf '{"part": "setup", "status": "%s", "rc": %d, "seconds": %d}\n' \
        "$([[ $rc == 0 ]] && echo ok || echo failed)" "$rc" "$((SECONDS - KIT_START))" >>"$KIT_JSONL"
    ((rc == 0)) || echo "setup: pip failed (rc $rc); the pre-flight will say what is missing" | tee -a "$LOG"
    export PYTHONPATH=/tmp/instructedit-site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    uname -srm
    if command -v nvidia-smi >/dev/null; then
        timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
            --format=csv,noheader
    else
        echo "nvidia-smi: not found"
    fi
    "$PYTHON" --version
} 2>&1 | tee "$OUT/device.txt" | tee -a "$LOG"

# -- 2. pre-flight -------------------------------------------------------------------------
if [[ $KIT_TINY == 1 ]]; then
    # Last on each engine command line, so they win over the part's own --steps/--rounds.
    TINY=(--tiny --steps 3 --rounds 1)
    PREFLIGHT=(bench/gpu_preflight.py --allow-cpu)
    FULL_RES=(bench/full_resolution_bench.py --device cpu --runs 2)
    EDIT_WALL=(bench/edit_wall_time.py --tiny --runs 1)
    DATAGEN=(bench/datagen_bench.py --images --device cpu --image-rows 1)
else
    TINY=()
    PREFLIGHT=(bench/gpu_preflight.py)
    FULL_RES=(bench/full_resolution_bench.py --device cuda --runs 10)
    EDIT_WALL=(bench/edit_wall_time.py --runs 3)
    DATAGEN=(bench/datagen_bench.py --images --full-size --device cuda --image-rows 3)
fi
if ! run_part preflight "$PREFLIGHT_TIMEOUT_S" "$KIT_JSONL" stdout "$PYTHON" "${PREFLIGHT[@]}"; then
    echo "PRE-FLIGHT FAILED: nothing else was run (kit.log says why)" | tee -a "$LOG"
    exit 1
fi

# -- 3. the parts, most valuable first -----------------------------------------------------
ENGINE=("$PYTHON" bench/engine_bench.py --jsonl "$ENGINE_JSONL")
run_part stock-eager "$STOCK_EAGER_TIMEOUT_S" "$ENGINE_JSONL" self \
    "${ENGINE[@]}" --part stock-eager --batches 1 4 8 --rounds 5 "${TINY[@]}"
# TORCH_LOGS puts dynamo's reasons for each recompile and graph break in kit.log.
run_part compiled "$COMPILED_TIMEOUT_S" "$ENGINE_JSONL" self \
    env TORCH_LOGS=recompiles,graph_breaks "${ENGINE[@]}" --part compiled \
    --compile-mode reduce-overhead --batches 1 8 4 --rounds 5 "${TINY[@]}"
run_part sync-debug "$SYNC_DEBUG_TIMEOUT_S" "$ENGINE_JSONL" self \
    "${ENGINE[@]}" --part sync-debug --batches 1 8 --steps 4 "${TINY[@]}"
run_part schedulers "$SCHEDULERS_TIMEOUT_S" "$ENGINE_JSONL" self \
    "${ENGINE[@]}" --part schedulers --steps 20 --rounds 5 "${TINY[@]}"
# The full-resolution path (detail-preserving upscaling, mask composite) on the GPU, and
# a whole edit at 1024x1024 and 2048x1365 with its share of the model's time.
run_part full-res "$FULL_RES_TIMEOUT_S" "$OUT/full_resolution.jsonl" stdout \
    "$PYTHON" "${FULL_RES[@]}"
run_part edit-wall "$EDIT_WALL_TIMEOUT_S" "$OUT/edit_wall_time.jsonl" stdout \
    "$PYTHON" "${EDIT_WALL[@]}"
run_part datagen "$DATAGEN_TIMEOUT_S" "$OUT/datagen.jsonl" self \
    "$PYTHON" "${DATAGEN[@]}" --jsonl "$OUT/datagen.jsonl"

echo "== done in $((SECONDS - KIT_START))s (status $status)" | tee -a "$LOG"
cat "$KIT_JSONL"
exit $status
