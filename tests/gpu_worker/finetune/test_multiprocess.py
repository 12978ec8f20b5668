"""Data-parallel fine-tuning: the CLI under `accelerate launch` with 2 processes on the
CPU (torch.distributed with gloo), 2 steps on the tiny model.

`accelerate launch --cpu --num_processes 2` starts CPU processes only through mpirun
(`--mpirun_hostfile`); without it, it starts one. `--multi_gpu` starts them with
torch.distributed.run, and on a machine without CUDA the trainer's Accelerator takes the
CPU (`cpu=True`), so the two processes train together over gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu_worker.finetune.make_dataset import write_tiny_export

REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_processes_train_together(tiny_model_dir, tmp_path):
    pytest.importorskip("accelerate")
    export = write_tiny_export(tmp_path / "export", rows=10, seed=0)
    dest = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(_free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "services.gpu_worker.finetune",
        "--dataset",
        str(export),
        "--base",
        tiny_model_dir,
        "--out",
        str(dest),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--resolution",
        "64",
        "--holdout-rows",
        "0",
        "--log-every",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "2 process(es)" in output
    checkpoint = dest / "checkpoints" / "step-2"
    assert sorted(p.name for p in checkpoint.glob("rank-*.pt")) == ["rank-0.pt", "rank-1.pt"]
    assert json.loads((checkpoint / "state.json").read_text())["world_size"] == 2
    assert (dest / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    # One process writes the metrics: one line per step.
    steps = [json.loads(line)["step"] for line in (dest / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
