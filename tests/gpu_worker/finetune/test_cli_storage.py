"""The CLI with a storage URL for --out: it trains in a local work directory, uploads
each checkpoint as it is written and the results at the end, and a run started again with
the same URL (here or on another machine) resumes from the stored checkpoint. The trainer's
step and loss gauges reach the worker's multiprocess metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from services.gpu_worker.finetune import storage_sync
from services.gpu_worker.finetune.__main__ import main
from services.gpu_worker.finetune.storage_sync import run_finetune_to_storage
from services.gpu_worker.finetune.task import finetune_metrics_registry
from tests.gpu_worker.finetune.make_dataset import write_tiny_export
from tests.gpu_worker.finetune.test_train import fast_config

FAST_ARGS = [
    "--resolution", "64", "--holdout-rows", "2", "--validation-rows", "1",
    "--validation-every", "2", "--validation-inference-steps", "2",
    "--checkpoint-every", "1", "--log-every", "1", "--batch-size", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return str(write_tiny_export(tmp_path_factory.mktemp("export") / "six", rows=6, seed=1))


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _stored(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_cli_into_storage_then_resume(export, tiny_model_dir, tmp_path, capsys):
    store = tmp_path / "store" / "ft1"
    dest = f"file://{store}"
    work = tmp_path / "work"
    base = ["--dataset", export, "--base", tiny_model_dir, "--out", dest, *FAST_ARGS]

    assert main([*base, "--max-steps", "2", "--work-dir", str(work)]) == 0
    assert f"{dest}/adapter" in capsys.readouterr().out
    keys = _stored(store)
    assert "adapter/pytorch_lora_weights.safetensors" in keys
    assert "checkpoints/step-2/state.json" in keys
    assert not any(k.startswith("checkpoints/step-1/") for k in keys)  # the older one went
    assert {"metrics.jsonl", "finetune.json"} <= keys
    assert any(k.startswith("validation/step-2/") and k.endswith(".png") for k in keys)
    assert _steps(store / "metrics.jsonl") == [1, 2]

    # Again with more steps: the same work directory, resumed from the stored step 2.
    assert main([*base, "--max-steps", "4", "--work-dir", str(work)]) == 0
    assert _steps(store / "metrics.jsonl") == [1, 2, 3, 4]
    assert "checkpoints/step-4/state.json" in _stored(store)
    assert json.loads((store / "finetune.json").read_text())["steps"] == 4

    # On "another machine" (an empty work directory): the checkpoint and the metrics
    # up to it come from the store; only steps 5-6 are trained.
    config = fast_config(
        max_steps=6, checkpoint_every=1, batch_size=2, holdout_rows=2, validation_rows=1,
        validation_every=2, validation_inference_steps=2,
    )  # fmt: skip
    trained = []
    result = run_finetune_to_storage(
        config,
        export,
        tiny_model_dir,
        dest,
        work_dir=tmp_path / "elsewhere",
        on_progress=lambda p: trained.append(p.step),
    )
    assert result.resumed_from == 4 and result.steps == 6 and trained == [5, 6]
    assert _steps(store / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    keys = _stored(store)
    assert "checkpoints/step-6/state.json" in keys
    assert not any(k.startswith("checkpoints/step-4/") for k in keys)
    assert any(k.startswith("validation/step-6/") for k in keys)


def test_killed_cli_run_resumes_from_the_stored_checkpoint(export, tiny_model_dir, tmp_path):
    dest = f"file://{tmp_path / 'store'}"
    config = fast_config(max_steps=4, checkpoint_every=1, batch_size=2)

    def die_at_step_3(progress):
        if progress.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune_to_storage(
            config, export, tiny_model_dir, dest, work_dir=tmp_path / "a", on_progress=die_at_step_3
        )
    # Step 3's checkpoint was never written; step 2's went up as it was.
    assert storage_sync.stored_checkpoints(storage_sync.open_storage_url(dest), "checkpoints") == [
        2
    ]
    result = run_finetune_to_storage(config, export, tiny_model_dir, dest, work_dir=tmp_path / "b")
    assert result.resumed_from == 2 and result.steps == 4 and not result.stopped
    assert _steps(tmp_path / "b" / "metrics.jsonl") == [1, 2, 3, 4]


def test_default_work_dir_is_per_destination():
    a = storage_sync.default_work_dir("s3://bucket/ft/1")
    assert a == storage_sync.default_work_dir("s3://bucket/ft/1/")
    assert a != storage_sync.default_work_dir("s3://bucket/ft/2")


def test_work_dir_needs_a_storage_url(tmp_path):
    with pytest.raises(SystemExit):
        main(["--dataset", "x", "--base", "y", "--out", str(tmp_path), "--work-dir", "w"])


def test_no_registry_when_worker_metrics_are_off(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert finetune_metrics_registry() is None


def test_gauges_reach_the_worker_metrics_port(export, tiny_model_dir, tmp_path):
    """As in a worker: the parent serves a MultiProcessCollector over the directory; a run
    in a child process (the pool child) sets the gauges through the task's registry."""
    directory = tmp_path / "prom"
    directory.mkdir()
    script = textwrap.dedent(
        f"""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        from services.gpu_worker.finetune.task import finetune_metrics_registry
        from services.gpu_worker.finetune.train import run_finetune
        from tests.gpu_worker.finetune.test_train import fast_config

        for max_steps in (2, 3):  # twice in one process, as a pool child does
            run_finetune(fast_config(max_steps=max_steps, batch_size=2), {export!r},
                         {tiny_model_dir!r}, {str(tmp_path / "out")!r},
                         metrics=finetune_metrics_registry())
        served = CollectorRegistry()
        MultiProcessCollector(served, path={str(directory)!r})
        print(generate_latest(served).decode())
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("instructedit_finetune")]
    # livemostrecent: one series, the latest value of the live processes (no pid label).
    step = [line for line in lines if line.startswith("instructedit_finetune_step ")]
    assert step == ["instructedit_finetune_step 3.0"], lines
    assert any(line.startswith("instructedit_finetune_loss ") for line in lines), lines
