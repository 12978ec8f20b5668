"""The engine benchmark runs end to end at tiny scale on CPU (a smoke run, not timed)."""

import json
import math

import torch
from PIL import Image

from bench.engine_bench import (
    Rows,
    build_tiny_pipeline,
    edit_tflop,
    engine_options,
    main,
    make_noop,
)
from services.common.edit_params import EditParams
from services.gpu_worker.engine import EditEngine


def cli(options: str, jsonl) -> list[str]:
    return [*options.split(), str(jsonl)]


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


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


def test_rows_are_on_disk_as_soon_as_emitted(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = Rows("some-part", path)
    rows.emit({"kind": "result", "ms": 1.234567})
    assert read_rows(path) == [
        {"part": "some-part", "kind": "result", "ms": 1.2346, "at": rows.rows[0]["at"]}
    ]


def test_stock_eager_part_writes_a_row_per_measurement(tmp_path):
    path = tmp_path / "engine.jsonl"
    main(cli("--tiny --part stock-eager --steps 2 --batches 1 2 --rounds 1 --jsonl", path))
    rows = read_rows(path)
    assert {row["part"] for row in rows} == {"stock-eager"}
    assert [(row["kind"], row.get("config"), row.get("batch")) for row in rows] == [
        ("meta", None, None),
        ("result", "stock diffusers", 1),
        ("result", "ours", 1),
        ("result", "ours", 2),
    ]


def test_schedulers_part_runs_half_the_steps_with_dpmpp_2m(tmp_path):
    path = tmp_path / "engine.jsonl"
    main(["--tiny", "--part", "schedulers", "--steps", "4", "--rounds", "1", "--jsonl", str(path)])
    results = [row for row in read_rows(path) if row["kind"] == "result"]
    assert [(r["scheduler"], r["steps"], r["batch"]) for r in results] == [
        ("euler_ancestral", 4, 1),
        ("dpmpp_2m", 2, 1),
    ]


def test_sync_debug_part_says_what_it_could_not_check_on_cpu(tmp_path):
    path = tmp_path / "engine.jsonl"
    main(cli("--tiny --part sync-debug --steps 2 --batches 1 2 --jsonl", path))
    rows = read_rows(path)
    checks = [row for row in rows if row["kind"] == "sync_free"]
    # Each batch size twice: its first call and one after.
    assert [(row["batch"], row["call"]) for row in checks] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    # On CPU there is nothing to prove: neither true nor false, and a note says why.
    assert all(row["sync_free"] is None and row["note"] for row in checks)
    assert all("error" not in row for row in checks)
    assert rows[-1]["kind"] == "sync_census"


def test_engine_options_takes_only_what_the_engine_has():
    import torch

    options, missing = engine_options(
        torch.device("cpu"), max_batch=4, no_such_option=True, compile_unet=False
    )
    assert missing == ["no_such_option"]
    assert options.max_batch == 4 and options.device == "cpu"


def test_noop_model_keeps_the_shapes():
    pipe = build_tiny_pipeline()
    make_noop(pipe)
    engine = EditEngine("tiny", engine_options(__import__("torch").device("cpu"))[0])
    engine.use_pipeline(pipe)
    image = Image.new("RGB", (128, 64), (10, 20, 30))
    (edited,) = engine.predict(image, EditParams(prompt="x", num_inference_steps=2, seed=0))
    assert edited.size == image.size


def test_host_overhead_reports_ms_per_step(tmp_path, capsys):
    path = tmp_path / "host.jsonl"
    threads = torch.get_num_threads()
    rows = main(cli("--host-overhead --steps 3 --rounds 2 --batches 1 2 --jsonl", path))
    # Later tests compare bit for bit with pipelines run in this process.
    assert torch.get_num_threads() == threads
    assert read_rows(path) == rows
    meta, *figures = rows
    assert meta["kind"] == "meta" and meta["model"] == "tiny, UNet and VAE no-ops"
    assert [r["batch"] for r in figures] == [1, 2]
    for r in figures:
        assert math.isfinite(r["ms_per_step"]) and r["batch_ms"] > 0
        assert r["on_step_interval_ms"] > 0
    assert "| batch | ms per step |" in capsys.readouterr().out


def test_sync_census_counts_syncs_by_where_they_come_from(monkeypatch):
    """CUDA's sync debug mode "warn" reports each sync as a Python warning; the census
    counts them by the innermost frame (here a stand-in engine, on CPU)."""
    import warnings

    import torch

    import bench.engine_bench as bench

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    class Engine:
        def predict_batch(self, requests):
            for _ in range(3 * len(requests)):
                warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
            warnings.warn("something else", stacklevel=1)

    ours, inner = bench.sync_census(Engine(), Image.new("RGB", (64, 64)), steps=2, batch=2)
    assert sum(ours.values()) == sum(inner.values()) == 6
    ((site, count),) = inner.items()
    assert site.startswith("tests/bench/test_engine_bench.py:") and count == 6
