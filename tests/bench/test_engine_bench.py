"""The engine benchmark runs end to end at tiny scale on CPU (a smoke run, not timed)."""

import json

from bench.engine_bench import edit_tflop, main


def test_reference_flops():
    assert round(edit_tflop(20), 1) == 44.2


def test_tiny_smoke_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = main(
        ["--tiny", "--steps", "2", "--batches", "1", "2", "--rounds", "1", "--json", str(out)]
    )
    assert [(r.config, r.batch) for r in results] == [
        ("stock diffusers", 1),
        ("ours", 1),
        ("ours", 2),
    ]
    assert all(r.ms_per_edit > 0 and r.edits_per_s > 0 for r in results)
    assert all(r.mfu is None and r.peak_mem_gb is None for r in results)  # CPU: no GPU figures
    saved = json.loads(out.read_text())
    assert saved["meta"]["model"] == "tiny"
    assert "| stock diffusers | 1 |" in capsys.readouterr().out
