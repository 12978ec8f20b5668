"""The CLI without a running stack: usage, bad files, an unreachable API, the contact
sheet and the batch's input and journal."""

from __future__ import annotations

import json

from PIL import Image

from instructedit.batch import STATE_NAME, BatchError, Journal, load_items
from instructedit.contact_sheet import compose
from tests.cli import run_cli
from tests.conftest import image_bytes
from tests.stack import free_port


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("edit", "status", "cancel", "list", "delete", "grid", "batch", "datasets"):
        assert command in result.stdout


def test_a_missing_file_is_exit_2_with_one_line(tmp_path):
    result = run_cli("edit", tmp_path / "nope.jpg", "make it red", url="http://127.0.0.1:9")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.jpg'}: no such file"]
    assert "Traceback" not in result.stderr


def test_an_unknown_output_extension_is_exit_2(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes())
    result = run_cli("edit", tmp_path / "a.png", "x", "-o", tmp_path / "out.gif")
    assert result.returncode == 2
    assert "--format" in result.stderr


def test_an_unreachable_api_is_exit_3_with_a_clear_message(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes())
    url = f"http://127.0.0.1:{free_port()}"
    for args in (
        ("edit", tmp_path / "a.png", "make it red", "-o", tmp_path / "out.png"),
        ("status", "abc"),
        ("list",),
        ("batch", tmp_path, "make it red", "-o", tmp_path / "out"),
    ):
        result = run_cli("--retries", "1", *args, url=url, timeout=60)
        assert result.returncode == 3, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith(f"error: cannot reach the InstructEdit API at {url}"), lines
        assert "Traceback" not in result.stderr


def test_the_contact_sheet_has_a_cell_per_pair_and_labels():
    cells = {
        (s_i, s_t): Image.new("RGB", (64, 48), (int(s_i * 60), int(s_t * 20), 90))
        for s_i in (1.0, 2.0)
        for s_t in (5.0, 7.5, 10.0)
    }
    cells[(2.0, 10.0)] = "failed: boom"
    sheet = compose(cells, [1.0, 2.0], [5.0, 7.5, 10.0], title="make it red")
    # Three columns, two rows of cells, plus the axes.
    assert sheet.width > 3 * 160 and sheet.height > 2 * 120


def test_batch_items_from_a_folder_and_manifests(tmp_path):
    for name in ("b.png", "a.jpg", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(image_bytes())
    items = load_items(tmp_path, "make it red", {"num_inference_steps": 3})
    assert [i.key for i in items] == ["a.jpg", "a.png", "b.png"]
    # a.png collides with a.jpg: the index is appended.
    assert [i.stem for i in items] == ["a", "a-1", "b"]
    assert all(i.params == {"num_inference_steps": 3} and i.problem is None for i in items)

    csv_path = tmp_path / "m.csv"
    csv_path.write_text(
        "image,instruction,seed,guidance_scale,mask_invert\n"
        "a.jpg,,5,,\n"
        "https://example.com/x/shoe.webp?sig=1,make it blue,,8.5,yes\n"
        "a.jpg,,abc,,\n"
        ",,,,\n"
    )
    items = load_items(csv_path, "make it red", {})
    assert items[0].instruction == "make it red" and items[0].params == {"seed": 5}
    assert items[0].source == str(tmp_path / "a.jpg")
    assert items[1].instruction == "make it blue" and items[1].stem == "shoe"
    assert items[1].params == {"guidance_scale": 8.5, "mask_invert": True}
    assert items[2].stem == "a-2" and "seed" in items[2].problem
    assert "no image" in items[3].problem

    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"image": "b.png", "num_inference_steps": 4}) + "\n\n")
    (item,) = load_items(jsonl, None, {})
    assert item.params == {"num_inference_steps": 4} and "no instruction" in item.problem

    (tmp_path / "bad.csv").write_text("image,colour\na.jpg,red\n")
    try:
        load_items(tmp_path / "bad.csv", "x", {})
    except BatchError as exc:
        assert "colour" in str(exc)
    else:
        raise AssertionError("an unknown column is refused")


def test_the_journal_survives_a_line_cut_short(tmp_path):
    journal = Journal(tmp_path / STATE_NAME)
    journal.record({"type": "submitted", "key": "a", "job_id": "j1"})
    journal.record({"type": "done", "key": "b", "job_id": "j2", "outputs": ["b.png"]})
    journal.record({"type": "submitted", "key": "c", "job_id": "j3"})
    journal.record({"type": "failed", "key": "c", "reason": "boom"})
    journal.close()
    with (tmp_path / STATE_NAME).open("a") as f:
        f.write('{"type": "done", "key": "a", "jo')  # killed mid-write
    again = Journal(tmp_path / STATE_NAME)
    assert again.nonce == journal.nonce
    assert again.pending_job("a") == "j1" and again.done("a") is None
    assert again.done("b")["outputs"] == ["b.png"]
    assert again.pending_job("c") is None and again.attempt("c") == 1
    again.record({"type": "done", "key": "a", "job_id": "j1", "outputs": ["a.png"]})
    again.close()
    assert Journal(tmp_path / STATE_NAME).done("a")["outputs"] == ["a.png"]
