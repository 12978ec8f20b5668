"""bench/finetune_bench.py's mechanics on the tiny model: a row per setting, from the
trainer's own metrics, with the memory target judged where the issue sets one."""

import json

from bench import finetune_bench


def test_a_setting_gives_a_row_with_speed_and_memory(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    rows = finetune_bench.main(
        ["--tiny", "--steps", "2", "--only", "lora-b4-gc", "--jsonl", str(out)]
    )
    [row] = rows
    assert row["setting"] == "lora-b4-gc" and row["batch"] == 4 and "error" not in row, row
    assert row["steps"] == 2 and row["images_per_s"] > 0 and row["peak_memory_gb"] > 0
    assert row["within_target"] is True  # 12 GB: the tiny model is far below
    assert row["adam_8bit"] is False  # no CUDA here: the trainer used AdamW
    assert json.loads(out.read_text()) == row
    assert json.loads(capsys.readouterr().out.strip()) == row
