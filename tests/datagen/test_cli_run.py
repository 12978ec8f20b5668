"""`python -m services.datagen run`: the whole pipeline in-process, resumable."""

from pathlib import Path

import pytest

from services.datagen.__main__ import main
from services.datagen.tiny_sd import write_tiny_stable_diffusion


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return write_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd")


def test_run_exports_then_resumes_without_regenerating(tmp_path, tiny_sd, capsys):
    out = f"file://{tmp_path}/out"
    argv = [
        "run",
        "--rows",
        "2",
        "--pairs",
        "1",
        "--out",
        out,
        "--model",
        str(tiny_sd),
        "--steps",
        "2",
        "--resolution",
        "64",
        "--device",
        "cpu",
        "--no-filter",
    ]
    assert main(argv) == 0
    first = capsys.readouterr().err
    assert "2 rows (0 already stored), 2 of 2 candidate pairs kept" in first
    shards = list(tmp_path.glob("out/datasets/*/export/data/train-*.parquet"))
    assert len(shards) == 1
    rows = sorted(tmp_path.glob("out/datasets/*/rows/*.json"))
    mtimes = [p.stat().st_mtime_ns for p in rows]

    assert main(argv) == 0
    assert "2 rows (2 already stored)" in capsys.readouterr().err
    assert [p.stat().st_mtime_ns for p in rows] == mtimes


def test_run_rejects_bad_ranges(tmp_path, capsys):
    argv = ["run", "--rows", "1", "--out", f"file://{tmp_path}", "--p-range", "0.9,0.1"]
    assert main(argv) == 2
    assert "p_range" in capsys.readouterr().err


def _tiny_argv(tmp_path, tiny_sd) -> list[str]:
    return [
        "--pairs", "1", "--out", f"file://{tmp_path}/out", "--model", str(tiny_sd),
        "--steps", "2", "--resolution", "64", "--device", "cpu", "--no-filter",
    ]  # fmt: skip


def test_run_from_your_own_captions_rows(tmp_path, tiny_sd, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("black hoodie\na red leather handbag on a marble countertop\n")
    rows = tmp_path / "rows.jsonl"
    assert main(["text", "--captions", str(captions), "--edits-per-caption", "1",
                 "--out", str(rows)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["run", "--from-rows", str(rows), *_tiny_argv(tmp_path, tiny_sd)]) == 0
    assert "2 rows (0 already stored), 2 of 2 candidate pairs kept" in capsys.readouterr().err


def test_run_refuses_rows_that_fail_the_audit(tmp_path, tiny_sd, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"input_caption": "a teacup on a bathroom vanity", "instruction": "make it snow",'
        ' "output_caption": "a teacup on a bathroom vanity, in falling snow"}\n'
    )
    assert main(["run", "--from-rows", str(rows), *_tiny_argv(tmp_path, tiny_sd)]) == 2
    err = capsys.readouterr().err
    assert "setting_contradiction" in err and "fail the data audit" in err
    assert not list(tmp_path.glob("out/datasets/*"))
