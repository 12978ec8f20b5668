"""Parquet export in the Hugging Face datasets layout, loaded back with `datasets`."""

from __future__ import annotations

import io
import re
from importlib import resources

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from services.common.storage import FileStorage, S3Storage
from services.datagen.dataset_export import (
    CARD_NAME,
    SCORE_COLUMNS,
    DatasetWriter,
    arrow_schema,
    card_template_parts,
    dataset_card,
    export_dataset,
)
from tests.datagen.conftest_images import Row, fake_pair

# diffusers examples/instruct_pix2pix/train_instruct_pix2pix.py: column defaults.
TRAIN_SCRIPT_COLUMNS = {
    "original_image_column": "input_image",
    "edit_prompt_column": "edit_prompt",
    "edited_image_column": "edited_image",
}
COLUMNS = [
    "input_image",
    "edit_prompt",
    "edited_image",
    "input_caption",
    "output_caption",
    "category",
    "edit_type",
    "seed",
    "p",
    "text_guidance",
    "row_index",
    "pair_index",
]
SCORES = {"clip_sim_0": 0.31, "clip_sim_1": 0.29, "clip_sim_dir": 0.4, "clip_sim_image": 0.8}


def some_pairs(rows: int = 5, per_row: int = 2, scores=None):
    categories = ("home_kitchen", "apparel")
    edits = ("color_change", "material_change", "art_style")
    return [
        fake_pair(
            row,
            pair,
            category=categories[row % 2],
            edit_type=edits[row % 3],
            scores=scores,
            size=16 + 8 * (row % 2),
        )
        for row in range(rows)
        for pair in range(per_row)
    ]


def load(root, cache):
    import datasets

    files = sorted(str(p) for p in (root / "data").glob("train-*.parquet"))
    return datasets.load_dataset("parquet", data_files=files, cache_dir=str(cache))["train"]


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b))


def test_export_loads_with_datasets_and_decodes_images(tmp_path):
    import datasets

    pairs = some_pairs()
    storage = FileStorage(tmp_path / "store")
    # Small shards: 10 pairs of ~2 images of a few hundred bytes each -> several shards.
    summary = export_dataset(pairs, storage, "runs/r1", max_shard_bytes=1500, row_group_size=2)
    root = tmp_path / "store" / "runs" / "r1"
    count = len(summary.shard_keys)
    assert count > 1
    assert list(summary.shard_keys) == [
        f"runs/r1/data/train-{i:05d}-of-{count:05d}.parquet" for i in range(count)
    ]
    assert sorted(storage.list("runs/r1/")) == sorted([*summary.shard_keys, f"runs/r1/{CARD_NAME}"])
    assert summary.num_rows == len(pairs) and not summary.with_scores

    dataset = load(root, tmp_path / "cache")
    assert dataset.column_names == COLUMNS
    assert isinstance(dataset.features["input_image"], datasets.Image)
    assert isinstance(dataset.features["edited_image"], datasets.Image)
    assert dataset.features["seed"].dtype == "int64"
    assert dataset.features["p"].dtype == "float64"
    assert len(dataset) == len(pairs)
    for record, pair in zip(dataset, pairs, strict=True):
        assert isinstance(record["input_image"], Image.Image)
        assert same_pixels(record["input_image"], pair.input_image)
        assert same_pixels(record["edited_image"], pair.edited_image)
        assert record["edit_prompt"] == pair.instruction
        assert (record["input_caption"], record["output_caption"]) == (
            pair.input_caption,
            pair.output_caption,
        )
        assert (record["category"], record["edit_type"]) == (pair.category, pair.edit_type)
        assert (record["seed"], record["p"], record["text_guidance"]) == (
            pair.seed,
            pair.p,
            pair.text_guidance,
        )
        assert (record["row_index"], record["pair_index"]) == (pair.row_index, pair.pair_index)


def test_train_instruct_pix2pix_defaults_work_unchanged(tmp_path):
    import datasets

    export_dataset(some_pairs(2, 1), FileStorage(tmp_path), "ds")
    # The script's `--dataset_name <the export folder>`: load_dataset(name, config, cache_dir).
    dataset = datasets.load_dataset(str(tmp_path / "ds"), None, cache_dir=str(tmp_path / "c"))
    dataset = dataset["train"]
    # What the training script does with its default columns (see its preprocess_train).
    assert set(TRAIN_SCRIPT_COLUMNS.values()) <= set(dataset.column_names)
    for column in ("original_image_column", "edited_image_column"):
        image = dataset[0][TRAIN_SCRIPT_COLUMNS[column]].convert("RGB").resize((8, 8))
        assert np.asarray(image).shape == (8, 8, 3)
    assert isinstance(dataset[0][TRAIN_SCRIPT_COLUMNS["edit_prompt_column"]], str)


def test_filter_scores_become_columns_when_computed(tmp_path):
    pairs = some_pairs(2, 2, scores=SCORES)
    summary = export_dataset(pairs, FileStorage(tmp_path), "")
    assert summary.with_scores
    assert summary.shard_keys == ("data/train-00000-of-00001.parquet",)
    dataset = load(tmp_path, tmp_path / "cache")
    assert dataset.column_names == [*COLUMNS, *SCORE_COLUMNS]
    assert {name: dataset[0][name] for name in SCORE_COLUMNS} == SCORES


def test_pairs_with_and_without_scores_do_not_mix(tmp_path):
    storage = FileStorage(tmp_path)
    with pytest.raises(ValueError, match="has no CLIP scores"):
        export_dataset([fake_pair(0, scores=SCORES), fake_pair(1)], storage, "a")
    with pytest.raises(ValueError, match="has CLIP scores"):
        export_dataset([fake_pair(0), fake_pair(1, scores=SCORES)], storage, "b")
    # A failed export writes nothing.
    assert storage.list("") == []


def test_schema_carries_the_huggingface_features():
    schema = arrow_schema()
    assert schema.field("input_image").type.names == ["bytes", "path"]
    assert b"huggingface" in schema.metadata
    assert b'"input_image": {"_type": "Image"}' in schema.metadata[b"huggingface"]
    shard = io.BytesIO()
    pq.write_table(schema.empty_table(), shard)
    assert pq.read_schema(io.BytesIO(shard.getvalue())).metadata == schema.metadata


def test_dataset_card_has_a_yaml_header_and_counts(tmp_path):
    pairs = some_pairs(rows=6, per_row=2)
    storage = FileStorage(tmp_path)
    summary = export_dataset(
        pairs, storage, "ds", generation={"model": "tiny", "num_inference_steps": 3}
    )
    card = storage.get(f"ds/{CARD_NAME}").decode()
    assert card == dataset_card(summary, generation={"model": "tiny", "num_inference_steps": 3})
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, card[:200]
    header = yaml.safe_load(match.group(1))
    assert header["task_categories"] == ["image-to-image"]
    assert header["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*"}]
    features = {f["name"]: f["dtype"] for f in header["dataset_info"]["features"]}
    assert features["input_image"] == features["edited_image"] == "image"
    assert features["edit_prompt"] == "string" and features["seed"] == "int64"
    assert header["dataset_info"]["splits"][0]["num_examples"] == 12
    assert header["size_categories"] == ["n<1K"]

    assert summary.pairs_per_category == {"apparel": 6, "home_kitchen": 6}
    assert summary.rows_per_category == {"apparel": 3, "home_kitchen": 3}
    assert summary.pairs_per_edit_type == {"art_style": 4, "color_change": 4, "material_change": 4}
    assert "| `apparel` | 6 | 3 |" in card
    assert "| `color_change` | 4 | 2 |" in card
    assert "| **total** | 12 | 6 |" in card
    assert "| `num_inference_steps` | `3` |" in card


def _card_template_text() -> str:
    source = resources.files("services.datagen") / "templates" / "dataset_card.md"
    return source.read_text(encoding="utf-8")


def test_the_card_template_keeps_its_wording_out_of_the_code():
    parts = card_template_parts(_card_template_text())
    assert parts["no_clip_scores_note"].template == "No CLIP filter was applied."
    assert parts["card"].template.startswith("---\n$header\n---\n\n# $pretty_name\n")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.replace("<!-- part: total_row -->", "<!-- part: sum_row -->"), "parts"),
        (lambda t: t.replace("$pretty_name", "$title"), r"unknown placeholder \['title'\]"),
        (lambda t: t.replace("Parquet shard(s)", "Parquet $ shard(s)"), "write \\$\\$"),
        (lambda t: t.replace("| `$name` | `$value` |", "| `$name` | `$pairs` |"), "'pairs'"),
    ],
)
def test_a_broken_card_template_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        card_template_parts(change(_card_template_text()))


def test_a_new_export_replaces_the_shards_of_the_last_one(tmp_path):
    storage = FileStorage(tmp_path)
    first = export_dataset(some_pairs(6, 2), storage, "ds", max_shard_bytes=1000)
    assert len(first.shard_keys) > 1
    second = export_dataset(some_pairs(1, 1), storage, "ds")
    assert (
        storage.list("ds/data/")
        == list(second.shard_keys)
        == ["ds/data/train-00000-of-00001.parquet"]
    )
    assert len(load(tmp_path / "ds", tmp_path / "cache")) == 1


def test_an_empty_export_is_one_shard_with_the_schema_and_no_rows(tmp_path):
    # (`datasets` refuses empty splits; pyarrow, pandas and the card still see the dataset.)
    storage = FileStorage(tmp_path)
    summary = export_dataset([], storage, "empty")
    assert summary.num_rows == 0 and len(summary.shard_keys) == 1
    table = pq.read_table(io.BytesIO(storage.get(summary.shard_keys[0])))
    assert table.num_rows == 0 and table.schema == arrow_schema()
    assert table.schema.metadata == arrow_schema().metadata
    assert "num_examples: 0" in storage.get(summary.card_key).decode()


def test_an_exception_while_writing_leaves_storage_untouched(tmp_path):
    storage = FileStorage(tmp_path)
    with pytest.raises(KeyError), DatasetWriter(storage, "ds", max_shard_bytes=10) as writer:
        writer.add_many(some_pairs(3, 1))
        raise KeyError("stop")
    assert storage.list("") == []
    with pytest.raises(RuntimeError, match="closed"):
        writer.add(fake_pair())


def test_export_to_s3(monkeypatch):
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="datasets")
        storage = S3Storage("datasets", "instructedit")
        summary = export_dataset(some_pairs(2, 2), storage, "run-7")
        assert storage.list("run-7/") == [
            "run-7/data/train-00000-of-00001.parquet",
            f"run-7/{CARD_NAME}",
        ]
        table = pq.read_table(io.BytesIO(storage.get(summary.shard_keys[0])))
        assert table.num_rows == 4
        assert table.schema.metadata == arrow_schema().metadata
        head = boto3.client("s3", region_name="us-east-1").head_object(
            Bucket="datasets", Key="instructedit/run-7/data/train-00000-of-00001.parquet"
        )
        assert head["ContentType"] == "application/vnd.apache.parquet"


def test_one_row_end_to_end(pair_generator, clip_filter, tmp_path):
    """Text row -> pairs -> CLIP scores -> Parquet -> datasets, in process."""
    import dataclasses

    from services.datagen.clip_filter import select_pairs
    from services.datagen.pair_params import PairSampling, pair_params_for_row

    row = Row(index=42)
    pairs = pair_generator.generate_row(row, pair_params_for_row(0, row.index, PairSampling(2)))
    scored = clip_filter.score(pairs)
    # The tiny CLIP's scores are random: thresholds it clears, to keep both pairs.
    permissive = dataclasses.replace(
        clip_filter.config,
        min_caption_similarity=-1,
        min_directional_similarity=-1,
        min_image_similarity=-1,
    )
    kept = select_pairs(scored, permissive)
    summary = export_dataset(kept, FileStorage(tmp_path), "e2e")
    assert summary.num_rows == 2 and summary.with_scores
    dataset = load(tmp_path / "e2e", tmp_path / "cache")
    assert [r["pair_index"] for r in dataset] == [0, 1]
    assert same_pixels(dataset[1]["edited_image"], pairs[1].edited_image)
    assert dataset[0]["clip_sim_dir"] == pytest.approx(scored[0].scores["clip_sim_dir"])


def test_png_bytes_are_copied_into_the_shards_unchanged(tmp_path):
    """Pairs read back from storage carry their PNGs: the export copies those bytes (no
    decode and re-encode, which dominated the export's time) and they still load."""
    import dataclasses

    from PIL import PngImagePlugin

    def png(color, note: str) -> bytes:
        # A text chunk that a decode + re-encode would drop: proves the bytes are copied.
        info = PngImagePlugin.PngInfo()
        info.add_text("note", note)
        buffer = io.BytesIO()
        Image.new("RGB", (24, 16), color).save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()

    stored = []
    for pair in some_pairs(rows=3, per_row=1):
        stored.append(
            dataclasses.replace(
                pair,
                input_image=png((9, 99, 199), f"in {pair.row_index}"),
                edited_image=png((199, 99, 9), f"out {pair.row_index}"),
            )
        )
    storage = FileStorage(tmp_path / "store")
    summary = export_dataset(stored, storage, "runs/png")
    table = pq.read_table(tmp_path / "store" / summary.shard_keys[0])
    for row, pair in zip(table.to_pylist(), stored, strict=True):
        assert row["input_image"]["bytes"] == pair.input_image
        assert row["edited_image"]["bytes"] == pair.edited_image
        assert row["input_image"]["path"].endswith("_input.png")
    dataset = load(tmp_path / "store" / "runs" / "png", tmp_path / "cache")
    assert dataset[0]["input_image"].getpixel((0, 0)) == (9, 99, 199)
    assert dataset[0]["input_image"].info["note"] == "in 0"

    not_png = dataclasses.replace(stored[0], input_image=b"GIF89a...")
    with pytest.raises(ValueError, match="not a PNG"):
        export_dataset([not_png], storage, "runs/bad")
