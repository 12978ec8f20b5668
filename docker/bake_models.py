"""Bake model weights into a worker image at build time.

Used by the ``weights`` stage of docker/gpu_worker.Dockerfile and
docker/datagen.Dockerfile::

    docker build -f docker/gpu_worker.Dockerfile \
        --build-arg BAKE_MODELS="timbrooks/instruct-pix2pix" -t instructedit/gpu-worker:baked .

Usage: ``python bake_models.py DEST "org/model[@revision] [org/other ...]"``

Each model is downloaded with ``huggingface_hub.snapshot_download`` into
``DEST/<org>--<model>`` (a plain diffusers directory, not the HF cache layout),
and a ``.instructedit-baked`` marker is written last. At start-up,
docker/entrypoint.sh maps ``INSTRUCTEDIT_MODEL=org/model`` (and
``INSTRUCTEDIT_DATAGEN_MODEL``) to that directory, so a container never
downloads a baked model and the HF_HOME cache volume is not involved.

Which files are fetched is controlled by the space separated glob lists in
``BAKE_ALLOW_PATTERNS`` / ``BAKE_IGNORE_PATTERNS`` (build args of the same
name). The defaults keep the diffusers sub-folders (configs, tokenizers,
``*.safetensors``) and skip the monolithic root checkpoints, ``.bin``/``.ckpt``
duplicates, non-EMA and fp16-variant weights.

A token for gated or private repositories is read from the BuildKit secret
``hf_token`` (``docker build --secret id=hf_token,env=HF_TOKEN ...``); it is
mounted only for that RUN step and never stored in a layer.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DEFAULT_ALLOW = "model_index.json */*.json */*.txt */*.model */*.safetensors"
DEFAULT_IGNORE = "*.ckpt *.bin *.pt *.pth *.onnx *.onnx_data *.msgpack *.h5 *non_ema* *.fp16.*"
SECRET_PATH = Path("/run/secrets/hf_token")


def slug(repo_id: str) -> str:
    """Directory name of a baked model: ``org/name`` -> ``org--name``."""
    return repo_id.replace("/", "--")


def _patterns(env: str, default: str) -> list[str] | None:
    value = os.environ.get(env, default).split()
    return value or None


def _token() -> str | None:
    if SECRET_PATH.is_file():
        token = SECRET_PATH.read_text().strip()
        return token or None
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    dest = Path(argv[1])
    specs = argv[2].replace(",", " ").split()
    dest.mkdir(parents=True, exist_ok=True)
    if not specs:
        print("bake_models: BAKE_MODELS is empty, nothing baked")
        return 0

    from huggingface_hub import snapshot_download

    allow = _patterns("BAKE_ALLOW_PATTERNS", DEFAULT_ALLOW)
    ignore = _patterns("BAKE_IGNORE_PATTERNS", DEFAULT_IGNORE)
    token = _token()
    for spec in specs:
        repo_id, _, revision = spec.partition("@")
        target = dest / slug(repo_id)
        print(f"bake_models: {spec} -> {target}", flush=True)
        snapshot_download(
            repo_id=repo_id,
            revision=revision or None,
            local_dir=target,
            allow_patterns=allow,
            ignore_patterns=ignore,
            token=token,
        )
        if not (target / "model_index.json").is_file():
            print(
                f"bake_models: {spec} has no model_index.json (not a diffusers repo?)",
                file=sys.stderr,
            )
            return 1
        # huggingface_hub's download bookkeeping is not needed in the image.
        shutil.rmtree(target / ".cache", ignore_errors=True)
        (target / ".instructedit-baked").write_text(spec + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
