"""The InstructPix2Pix CLIP evaluation (services/gpu_worker/evaluate.py): its metrics, its
rows and the whole command on the tiny model, tiny CLIP and a tiny datagen export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from services.common.storage import FileStorage
from services.datagen.dataset_export import DatasetWriter
from services.datagen.pair_params import ImagePair
from services.gpu_worker import evaluate
from services.gpu_worker.evaluate import (
    ModelSpec,
    directional_similarity,
    image_similarity,
    load_eval_rows,
    run_evaluation,
    score_edits,
    sweep_points,
)

SIZE = (64, 48)
CAPTIONS = [
    ("a red mug on a table", "make it blue", "a blue mug on a table"),
    ("a white sneaker", "make it black", "a black sneaker"),
    ("a leather bag", "make it a watercolor painting", "a watercolor painting of a leather bag"),
    ("a wooden chair", "put it on a beach", "a wooden chair on a beach"),
]


def picture(number: int) -> Image.Image:
    image = Image.new("RGB", SIZE, (40 + 50 * number, 120, 200 - 40 * number))
    ImageDraw.Draw(image).ellipse((8 + 4 * number, 8, 40 + 4 * number, 40), fill=(250, 240, 20))
    return image


def write_export(directory: Path, rows: int = 4, pairs_per_row: int = 1) -> Path:
    """A datagen export (the project's own writer) of `rows` caption rows."""
    with DatasetWriter(FileStorage(directory), "export") as writer:
        for row in range(rows):
            input_caption, instruction, output_caption = CAPTIONS[row % len(CAPTIONS)]
            for pair in range(pairs_per_row):
                writer.add(
                    ImagePair(
                        row_index=row,
                        pair_index=pair,
                        category="home_kitchen",
                        edit_type="color_change",
                        input_caption=input_caption,
                        instruction=instruction,
                        output_caption=output_caption,
                        seed=row * 10 + pair,
                        p=0.5,
                        text_guidance=7.5,
                        num_inference_steps=3,
                        injected_steps=1,
                        denoising_steps=4,
                        input_image=picture(row),
                        edited_image=picture(row).transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                    )
                )
    return directory / "export"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    from services.datagen.tiny_clip import write_tiny_clip

    return str(write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip"))


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return evaluate._load_clip(tiny_clip, "cpu")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return write_export(tmp_path_factory.mktemp("export"))


# -- metrics ------------------------------------------------------------------------------


def test_identical_output_has_image_similarity_one_and_no_direction(clip):
    image = picture(0)
    scores = score_edits(clip, [image], [image.copy()], ["a red mug"], ["a blue mug"])
    assert scores["image_similarity"][0] == pytest.approx(1.0, abs=1e-5)
    assert scores["directional_similarity"][0] == 0.0


def test_changed_output_has_image_similarity_below_one(clip):
    image = picture(0)
    changed = Image.new("RGB", SIZE, (255, 255, 255))
    ImageDraw.Draw(changed).rectangle((0, 0, 30, 47), fill=(0, 0, 0))
    scores = score_edits(clip, [image], [changed], ["a red mug"], ["a blue mug"])
    assert scores["image_similarity"][0] < 1.0 - 1e-4
    assert scores["directional_similarity"][0] != 0.0
    assert -1.0 <= scores["directional_similarity"][0] <= 1.0


def test_metric_functions_on_embeddings():
    a = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert image_similarity(a, b).tolist() == pytest.approx([1.0, 0.0])
    text_in = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    text_out = torch.tensor([[0.0, 1.0, 1.0], [-1.0, 1.0, 1.0]])
    # Row 0: no image change, so no direction (0); row 1: image delta (-1, 1, 0) is
    # exactly the text delta (-1, 1, 0).
    assert directional_similarity(a, b, text_in, text_out).tolist() == pytest.approx([0.0, 1.0])
    # Opposite change: -1.
    assert directional_similarity(b[1:], a[1:], text_in[1:], text_out[1:]).item() == (
        pytest.approx(-1.0)
    )


def test_identity_editor_through_the_sweeps(clip, export_dir, tmp_path):
    """A "model" that returns its input: image similarity 1 and directional 0 everywhere."""
    rows = load_eval_rows(export_dir, 3, seed=0)
    points = sweep_points([1.0, 2.0], 7.5, [5.0], 1.5)
    metrics = run_evaluation(
        [ModelSpec("identity")],
        rows,
        points,
        clip,
        tmp_path,
        steps=2,
        editor_factory=lambda spec: lambda calls: [call.image.copy() for call in calls],
    )
    (model,) = metrics["models"]
    for points in model["sweeps"].values():
        for point in points:
            assert point["image_similarity"] == pytest.approx(1.0, abs=1e-5)
            assert point["directional_similarity"] == 0.0
            assert point["n"] == 3


# -- rows ---------------------------------------------------------------------------------


def test_rows_from_the_export(export_dir):
    rows = load_eval_rows(export_dir, 3, seed=1)
    assert len(rows) == 3
    by_caption = {c[0]: c for c in CAPTIONS}
    for row in rows:
        assert row.image.size == SIZE and row.image.mode == "RGB"
        assert (row.input_caption, row.instruction, row.output_caption) == (
            by_caption[row.input_caption]
        )
    # Deterministic for a seed; all rows when n is None or too large.
    again = load_eval_rows(export_dir / "data", 3, seed=1)
    assert [r.instruction for r in again] == [r.instruction for r in rows]
    assert len(load_eval_rows(export_dir, None)) == 4
    assert len(load_eval_rows(export_dir, 10)) == 4


def test_rows_prefer_one_pair_per_caption_row(tmp_path):
    export = write_export(tmp_path, rows=3, pairs_per_row=3)
    rows = load_eval_rows(export, 3, seed=0)
    assert len({row.input_caption for row in rows}) == 3


def test_rows_from_jsonl(tmp_path):
    lines = []
    for number, (before, instruction, after) in enumerate(CAPTIONS[:2]):
        picture(number).save(tmp_path / f"{number}.png")
        lines.append(
            json.dumps(
                {
                    "input_image": f"{number}.png",
                    "instruction": instruction,
                    "input_caption": before,
                    "output_caption": after,
                }
            )
        )
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    rows = load_eval_rows(tmp_path / "rows.jsonl", 5, seed=0)
    assert sorted(row.instruction for row in rows) == sorted(c[1] for c in CAPTIONS[:2])
    assert all(row.image.size == SIZE for row in rows)


def test_rows_without_captions_are_refused(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"input_image": "x.png", "edit_prompt": "hi"}))
    with pytest.raises(ValueError, match="input_caption"):
        load_eval_rows(tmp_path / "rows.jsonl")


# -- the command --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_model(tmp_path_factory) -> str:
    from services.gpu_worker.tiny_model import write_tiny_instruct_pix2pix

    return str(write_tiny_instruct_pix2pix(tmp_path_factory.mktemp("models") / "tiny-2", seed=1))


def test_command_compares_two_models(tiny_model_dir, second_model, tiny_clip, export_dir, tmp_path):
    out = tmp_path / "eval"
    evaluate.main(
        [
            "--model", tiny_model_dir,
            "--compare-model", second_model,
            "--dataset", str(export_dir),
            "--rows", "3",
            "--clip-model", tiny_clip,
            "--image-guidance", "1.0,1.5,2.2",
            "--fixed-text-guidance", "7.5",
            "--text-guidance", "3,10",
            "--fixed-image-guidance", "1.5",
            "--steps", "2",
            "--device", "cpu",
            "--out", str(out),
        ]
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "tradeoff.png").stat().st_size > 1000
    with Image.open(out / "tradeoff.png") as plot:
        assert plot.format == "PNG"
    assert metrics["rows"] == 3 and metrics["steps"] == 2
    assert [m["model"] for m in metrics["models"]] == [tiny_model_dir, second_model]
    for model in metrics["models"]:
        assert model["fixed"] == {"image_guidance": 7.5, "text_guidance": 1.5}
        image_sweep, text_sweep = (
            model["sweeps"]["image_guidance"],
            model["sweeps"]["text_guidance"],
        )
        assert [(p["text_guidance"], p["image_guidance"]) for p in image_sweep] == [
            (7.5, 1.0),
            (7.5, 1.5),
            (7.5, 2.2),
        ]
        assert [(p["text_guidance"], p["image_guidance"]) for p in text_sweep] == [
            (3.0, 1.5),
            (10.0, 1.5),
        ]
        for point in image_sweep + text_sweep:
            assert point["n"] == 3
            assert -1.0 <= point["image_similarity"] <= 1.0 + 1e-5
            assert -1.0 <= point["directional_similarity"] <= 1.0
            assert point["scale"] == (
                point["image_guidance"]
                if point["sweep"] == "image_guidance"
                else point["text_guidance"]
            )
    # Different weights, different edits.
    first, second = (m["sweeps"]["image_guidance"] for m in metrics["models"])
    assert [p["image_similarity"] for p in first] != [p["image_similarity"] for p in second]


@pytest.mark.parametrize("engine_adapters", [True, False], ids=["engine", "load_lora_weights"])
def test_adapter_changes_the_edits(
    engine_adapters, tiny_model_dir, clip, export_dir, tmp_path, monkeypatch
):
    """Base vs fine-tuned on one model: served as the engine's `adapter` parameter (the
    model loaded once), or, on an engine without adapters, with pipe.load_lora_weights."""
    from services.gpu_worker.adapters import write_tiny_lora

    adapter = write_tiny_lora(tiny_model_dir, tmp_path / "lora")
    loads = []
    real_load = evaluate.load_engine
    monkeypatch.setattr(
        evaluate, "load_engine", lambda *a, **k: loads.append(a) or real_load(*a, **k)
    )
    if not engine_adapters:
        monkeypatch.setattr(evaluate, "_engine_serves_adapters", lambda engine: False)
    rows = load_eval_rows(export_dir, 2, seed=0)
    points = sweep_points([1.5], 7.5, [], 1.5)
    metrics = run_evaluation(
        [ModelSpec(tiny_model_dir), ModelSpec(tiny_model_dir, str(adapter))],
        rows,
        points,
        clip,
        tmp_path / "eval",
        steps=2,
        device="cpu",
    )
    base, tuned = metrics["models"]
    assert base["adapter_mode"] is None
    assert tuned["adapter"] == str(adapter)
    assert tuned["adapter_mode"] == ("engine" if engine_adapters else "load_lora_weights")
    assert tuned["label"].endswith("+ lora")
    assert len(loads) == (1 if engine_adapters else 2)
    assert (
        base["sweeps"]["image_guidance"][0]["image_similarity"]
        != tuned["sweeps"]["image_guidance"][0]["image_similarity"]
    )
