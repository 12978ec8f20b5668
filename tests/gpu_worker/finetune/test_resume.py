"""Checkpoints: a run killed after a checkpoint and started again with the same command
continues the same loss curve to the same weights; a changed run is refused; a stop
request checkpoints; only the newest checkpoints stay."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from services.gpu_worker.finetune.checkpoint import checkpoint_dirs, read_state
from services.gpu_worker.finetune.train import ResumeRefused, run_finetune
from tests.gpu_worker.finetune.make_dataset import write_tiny_export
from tests.gpu_worker.finetune.test_train import fast_config


class Killed(Exception):
    """Stands for the process dying: raised from the progress callback mid-run."""


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    # 8 rows in batches of 2 over 3 buckets: epochs turn over, flips and dropout happen.
    return str(write_tiny_export(tmp_path_factory.mktemp("export") / "eight", rows=8, seed=2))


def _config(**overrides):
    defaults = {
        "max_steps": 6,
        "batch_size": 2,
        "checkpoint_every": 3,
        "learning_rate": 1e-2,
        "conditioning_dropout_prob": 0.2,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 2,
    }
    return fast_config(**{**defaults, **overrides})


def _losses(dest) -> dict[int, float]:
    lines = (dest / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def straight(export, tiny_model_dir, tmp_path_factory):
    dest = tmp_path_factory.mktemp("straight")
    return run_finetune(_config(), export, tiny_model_dir, dest)


def test_kill_and_resume_continues_the_same_run(straight, export, tiny_model_dir, tmp_path):
    def die_at_step_4(progress):
        if progress.step == 4:
            raise Killed

    with pytest.raises(Killed):
        run_finetune(_config(), export, tiny_model_dir, tmp_path, on_progress=die_at_step_4)
    assert [step for step, _ in checkpoint_dirs(tmp_path)] == [3]
    assert not (tmp_path / "adapter").exists()

    resumed = run_finetune(_config(), export, tiny_model_dir, tmp_path)
    assert resumed.resumed_from == 3 and resumed.steps == 6

    expected = _losses(straight.dest)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    after_resume = {r["step"]: r["loss"] for r in lines[4:]}  # steps 1-4, then the resumed run
    assert sorted(after_resume) == [4, 5, 6]
    for step in (4, 5, 6):
        assert after_resume[step] == pytest.approx(expected[step], abs=1e-5), step
    assert len(set(expected.values())) == 6  # the losses do differ from step to step

    want = load_file(straight.adapter_dir / "pytorch_lora_weights.safetensors")
    got = load_file(resumed.adapter_dir / "pytorch_lora_weights.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)


def test_a_changed_config_is_refused(straight, export, tiny_model_dir, tmp_path_factory):
    with pytest.raises(ResumeRefused, match="rank: checkpoint 16, now 8"):
        run_finetune(_config(rank=8), export, tiny_model_dir, straight.dest)
    other = str(write_tiny_export(tmp_path_factory.mktemp("export") / "other", rows=8, seed=3))
    with pytest.raises(ResumeRefused, match="dataset"):
        run_finetune(_config(), other, tiny_model_dir, straight.dest)
    with pytest.raises(ResumeRefused, match="mode"):
        run_finetune(_config(mode="full"), export, tiny_model_dir, straight.dest)


def test_finished_run_started_again_does_no_more_steps(straight, export, tiny_model_dir):
    # More steps on a finished run: allowed (max_steps does not change the weights' meaning).
    again = run_finetune(_config(), export, tiny_model_dir, straight.dest)
    assert again.resumed_from == 6 and again.steps == 6 and again.adapter_dir is not None


def test_stop_request_checkpoints_and_returns(export, tiny_model_dir, tmp_path):
    steps = []
    result = run_finetune(
        _config(),
        export,
        tiny_model_dir,
        tmp_path,
        on_progress=lambda p: steps.append(p.step),
        should_stop=lambda: len(steps) >= 2,
    )
    assert result.stopped and result.steps == 2 and result.adapter_dir is None
    assert [step for step, _ in checkpoint_dirs(tmp_path)] == [2]
    assert read_state(tmp_path / "checkpoints" / "step-2")["step"] == 2
    finished = run_finetune(_config(), export, tiny_model_dir, tmp_path)
    assert finished.resumed_from == 2 and finished.steps == 6 and not finished.stopped


def test_only_the_newest_checkpoints_stay(export, tiny_model_dir, tmp_path):
    config = _config(checkpoint_every=1, keep_checkpoints=2, max_steps=4)
    run_finetune(config, export, tiny_model_dir, tmp_path)
    assert [step for step, _ in checkpoint_dirs(tmp_path)] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3", "step-4"]


def test_full_finetune_with_ema_resumes_to_the_same_weights(export, tiny_model_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    config = _config(mode="full", ema=True, ema_decay=0.9, max_steps=4, checkpoint_every=10)
    straight = run_finetune(config, export, tiny_model_dir, tmp_path / "straight")
    steps = []
    stopped = run_finetune(
        config,
        export,
        tiny_model_dir,
        tmp_path / "resumed",
        on_progress=lambda p: steps.append(p.step),
        should_stop=lambda: len(steps) >= 2,
    )
    assert stopped.stopped and stopped.pipeline_dir is None
    resumed = run_finetune(config, export, tiny_model_dir, tmp_path / "resumed")
    assert resumed.resumed_from == 2 and resumed.pipeline_dir is not None
    assert _losses(tmp_path / "resumed") == pytest.approx(_losses(straight.dest), abs=1e-5)
    want = UNet2DConditionModel.from_pretrained(straight.pipeline_dir, subfolder="unet")
    got = UNet2DConditionModel.from_pretrained(resumed.pipeline_dir, subfolder="unet")
    for (name, a), (_, b) in zip(want.state_dict().items(), got.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
