#!/usr/bin/env bash
# Entrypoint of the InstructEdit worker images (docker/gpu_worker.Dockerfile,
# docker/datagen.Dockerfile). It prepares the environment, then execs the
# command (the Celery worker by default) so that the worker is the process that
# receives SIGTERM and does a warm shutdown.
#
# What it does, in order:
#   1. Baked weights: when INSTRUCTEDIT_MODEL / INSTRUCTEDIT_DATAGEN_MODEL is a
#      hub id that was baked into the image at build time (BAKE_MODELS build
#      arg, see docker/bake_models.py), point the variable at the baked copy
#      under $INSTRUCTEDIT_BAKED_MODELS_DIR, so nothing is downloaded.
#   2. INSTRUCTEDIT_MODEL=tiny: write a tiny random offline model once with
#      `python -m services.gpu_worker.tiny_model DIR` and point
#      INSTRUCTEDIT_MODEL at DIR (for the CPU profile and smoke tests).
#   3. GPU pinning: when INSTRUCTEDIT_GPU_LOCK_DIR is set and
#      CUDA_VISIBLE_DEVICES is not, claim one free GPU with an flock(1) on
#      $INSTRUCTEDIT_GPU_LOCK_DIR/gpuN.lock (a volume shared by all replicas)
#      and export CUDA_VISIBLE_DEVICES=N. The lock is held on file descriptor 9,
#      which the worker inherits, for as long as the container lives. With
#      more replicas than GPUs the extra replicas share a GPU (with a warning).
set -euo pipefail

log() { printf '[instructedit-entrypoint] %s\n' "$*" >&2; }

# --- 1. baked weights -------------------------------------------------------
baked_dir="${INSTRUCTEDIT_BAKED_MODELS_DIR:-/models/baked}"

use_baked() {
    local var="$1" value slug
    value="${!var:-}"
    # Only hub ids ("org/name", optionally "@revision") map to a baked copy.
    if [[ -z "$value" || "$value" == /* || "$value" == .* || "$value" == "tiny" ]]; then
        return 0
    fi
    slug="${value%%@*}"
    slug="${slug//\//--}"
    if [[ -f "$baked_dir/$slug/.instructedit-baked" ]]; then
        log "$var=$value -> baked copy $baked_dir/$slug"
        export "$var=$baked_dir/$slug"
    fi
}

use_baked INSTRUCTEDIT_MODEL
use_baked INSTRUCTEDIT_DATAGEN_MODEL

# --- 2. tiny offline model ----------------------------------------------------
if [[ "${INSTRUCTEDIT_MODEL:-}" == "tiny" ]]; then
    tiny_dir="${INSTRUCTEDIT_TINY_MODEL_DIR:-${HOME:-/tmp}/tiny-model}"
    if [[ ! -f "$tiny_dir/.instructedit-complete" ]]; then
        log "INSTRUCTEDIT_MODEL=tiny: writing a tiny random model to $tiny_dir"
        rm -rf "$tiny_dir"
        python -m services.gpu_worker.tiny_model "$tiny_dir"
        touch "$tiny_dir/.instructedit-complete"
    fi
    export INSTRUCTEDIT_MODEL="$tiny_dir"
fi

# --- 3. one GPU per worker container ------------------------------------------
gpu_count() {
    if [[ -n "${INSTRUCTEDIT_GPU_COUNT:-}" ]]; then
        printf '%s\n' "$INSTRUCTEDIT_GPU_COUNT"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        local n=0 dev
        for dev in /dev/nvidia[0-9]*; do
            [[ -e "$dev" ]] && n=$((n + 1))
        done
        printf '%s\n' "$n"
    fi
}

lock_dir="${INSTRUCTEDIT_GPU_LOCK_DIR:-}"
if [[ -n "$lock_dir" && -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    n_gpus="$(gpu_count)"
    if [[ ! "$n_gpus" =~ ^[0-9]+$ || "$n_gpus" -eq 0 ]]; then
        log "GPU pinning: no GPU visible, leaving CUDA_VISIBLE_DEVICES unset"
    elif ! command -v flock >/dev/null 2>&1 || ! mkdir -p "$lock_dir" 2>/dev/null || [[ ! -w "$lock_dir" ]]; then
        log "GPU pinning: $lock_dir is not writable (or flock is missing), not pinning"
    else
        claimed=""
        for ((i = 0; i < n_gpus; i++)); do
            exec 9>>"$lock_dir/gpu$i.lock"
            if flock --nonblock 9; then
                claimed="$i"
                break
            fi
            exec 9>&-
        done
        if [[ -z "$claimed" ]]; then
            # More replicas than GPUs: share one, spread by host name.
            claimed=$(( $(printf '%s' "${HOSTNAME:-worker}" | cksum | cut -d' ' -f1) % n_gpus ))
            log "GPU pinning: all $n_gpus GPU(s) already claimed, sharing GPU $claimed"
        else
            log "GPU pinning: claimed GPU $claimed of $n_gpus"
        fi
        export CUDA_VISIBLE_DEVICES="$claimed"
    fi
fi

exec "$@"
