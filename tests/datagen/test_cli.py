"""``python -m services.datagen text`` end to end, in process and as a module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from services.datagen.__main__ import build_parser, main

from .conftest import write_catalog

REPO = Path(__file__).resolve().parents[2]


def test_text_writes_json_lines(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert main(["text", "--rows", "250", "--seed", "5", "--out", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 250
    first = json.loads(lines[0])
    assert {
        "input_caption",
        "instruction",
        "output_caption",
        "category",
        "edit_type",
        "changed_slots",
        "input_slots",
        "output_slots",
        "seed",
        "index",
    } <= set(first)
    assert first["seed"] == 5 and first["index"] == 0
    assert "wrote 250 rows" in capsys.readouterr().err


def test_same_arguments_give_the_same_bytes(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    main(["text", "--rows", "400", "--seed", "9", "--out", str(a)])
    main(["text", "--rows", "400", "--seed", "9", "--out", str(b)])
    assert a.read_bytes() == b.read_bytes()


def test_exhausted_catalog_fails_cleanly_without_a_file(tmp_path, capsys):
    catalog = write_catalog(tmp_path / "catalog")
    out = tmp_path / "rows.jsonl"
    code = main(["text", "--rows", "100000", "--out", str(out), "--catalog", str(catalog)])
    assert code == 1
    assert "exhausted" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".rows.jsonl.*"))


def test_subcommands_register_on_one_parser():
    parser = build_parser()
    args = parser.parse_args(["text", "--out", "x.jsonl"])
    assert args.command == "text" and args.rows == 3000 and args.seed == 0
    assert callable(args.handler)


def _run_module(out: Path, rows: int, hash_seed: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.datagen", "text", "--rows", str(rows), "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_runs_as_a_module_reproducibly_across_processes(tmp_path):
    # Different string-hash seeds: nothing may depend on set or dict-of-hash order.
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _run_module(a, 300, "1")
    _run_module(b, 300, "2")
    assert len(a.read_text(encoding="utf-8").splitlines()) == 300
    assert a.read_bytes() == b.read_bytes()
