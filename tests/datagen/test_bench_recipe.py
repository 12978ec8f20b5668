"""bench/datagen_bench.py's recipe and audit parts, on the tiny model on a CPU (seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.datagen_bench import assumed_pass, main


@pytest.fixture
def one_thread():
    """Tiny kernels gain nothing from threads, and spin-waiting threads on a loaded CI
    machine make this seconds-long test take tens of seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_recipe_bench_reports_kept_pairs_per_minute_for_both_recipes(tmp_path, capsys, one_thread):
    out = tmp_path / "figures.jsonl"
    argv = ["--recipe", "--tiny", "--device", "cpu", "--image-rows", "1", "--new-steps", "2"]
    argv += ["--old-steps", "2", "--candidates", "8", "--candidate-batch-size", "3"]
    argv += ["--pairs-per-row", "2", "--assume-pass-rate", "0.5", "--jsonl", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ASSUMED" in printed and "time per kept pair" in printed
    new, old = (json.loads(line) for line in out.read_text().splitlines())
    assert (new["recipe"], old["recipe"]) == ("new", "old")
    assert new["filter"] and new["assumed_pass_rate"] == 0.5
    assert new["candidates_per_row"] == 8 and new["scheduler"] == "euler_ancestral"
    assert old["candidates_per_row"] == 2 and not old["filter"]
    assert old["candidates_made"] == old["pairs_kept"] == 2
    # The new recipe keeps the first 2 candidates its draw passes, in whole batches of 3.
    passing = [i for i in range(8) if assumed_pass(0, 1, i, 0.5)]
    assert new["pairs_kept"] == min(2, len(passing))
    if len(passing) >= 2:
        assert new["candidates_made"] == min(8, -(-(passing[1] + 1) // 3) * 3)
    assert new["kept_pairs_per_minute"] > 0 and old["kept_pairs_per_minute"] > 0


def test_audit_part_reports_the_audit_counts_per_seed(tmp_path, capsys):
    out = tmp_path / "audit.jsonl"
    assert (
        main(["--audit", "--audit-rows", "40", "--audit-seeds", "0", "1", "--jsonl", str(out)]) == 0
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["seed"] for line in lines] == [0, 1]
    assert all(line["rows"] == 40 and isinstance(line["counts"], dict) for line in lines)
    assert "seed 1: 40 rows" in capsys.readouterr().out
