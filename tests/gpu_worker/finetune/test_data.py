"""Fine-tuning data: loading datagen exports, aspect buckets, resumable batches."""

from __future__ import annotations

import io
import itertools
import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFile

from services.common.buckets import bucket_for
from services.common.settings import Settings
from services.gpu_worker.finetune.data import (
    BucketSampler,
    Columns,
    EditBatches,
    EditDataset,
    EditRow,
    collate,
    has_side_words,
    load_edit_dataset,
    split_holdout,
)
from tests.gpu_worker.finetune.make_dataset import RED, write_tiny_export

SIZES = ((64, 48), (48, 64), (64, 64))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    # Small shards: the export has several, read back as one dataset.
    return write_tiny_export(tmp_path_factory.mktemp("export"), rows=12, max_shard_bytes=1500)


@pytest.fixture(scope="module")
def dataset(export_dir):
    return load_edit_dataset(str(export_dir))


def rows_of(dataset):
    return [dataset.row(i) for i in range(len(dataset))]


def same_rows(a, b):
    assert len(a) == len(b)
    for x, y in zip(rows_of(a), rows_of(b), strict=True):
        assert x.prompt == y.prompt
        assert np.array_equal(np.asarray(x.input), np.asarray(y.input))
        assert np.array_equal(np.asarray(x.edited), np.asarray(y.edited))


# --- Loading ---------------------------------------------------------------------------


def test_loads_an_export_directory(export_dir, dataset):
    assert len(list((export_dir / "data").glob("train-*.parquet"))) > 1
    assert (export_dir / "dataset_card.md").is_file()
    assert len(dataset) == 12
    row = dataset.row(1)
    assert isinstance(row, EditRow)
    assert row.input.mode == row.edited.mode == "RGB"
    assert row.input.size == row.edited.size == SIZES[1]
    assert row.prompt == "make the square on the left red"
    # The edit: the square turns red, the background stays.
    edited = np.asarray(row.edited)
    source = np.asarray(row.input)
    changed = np.any(edited != source, axis=-1)
    assert changed.any()
    assert (edited[changed] == RED).all()
    assert dataset[1].prompt == row.prompt


def test_loads_a_file_glob_and_a_single_shard(export_dir, dataset):
    same_rows(load_edit_dataset(str(export_dir / "data" / "train-*.parquet")), dataset)
    first = sorted((export_dir / "data").glob("*.parquet"))[0]
    assert len(load_edit_dataset(str(first))) == pq.read_metadata(first).num_rows


def test_loads_a_file_storage_url(export_dir, dataset):
    same_rows(load_edit_dataset(f"file://{export_dir}"), dataset)
    settings = Settings(storage_url="file:///elsewhere")
    same_rows(load_edit_dataset(f"file://{export_dir}", storage_settings=settings), dataset)


def test_loads_an_s3_url(export_dir, dataset, monkeypatch):
    import boto3
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="datasets")
        for path in export_dir.rglob("*"):
            if path.is_file():
                key = path.relative_to(export_dir).as_posix()
                s3.put_object(Bucket="datasets", Key=f"runs/r1/{key}", Body=path.read_bytes())
                # A neighbouring export whose prefix starts alike is not read.
                s3.put_object(Bucket="datasets", Key=f"runs/r10/{key}", Body=path.read_bytes())
        same_rows(load_edit_dataset("s3://datasets/runs/r1"), dataset)


def test_loads_through_datasets(export_dir, dataset, tmp_path):
    files = sorted(str(p) for p in (export_dir / "data").glob("train-*.parquet"))
    loaded = load_edit_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "cache"))
    same_rows(loaded, dataset)
    assert loaded.sizes() == dataset.sizes()


def test_column_names_are_settable(export_dir, tmp_path):
    table = pq.read_table(sorted((export_dir / "data").glob("*.parquet"))[0])
    renamed = table.rename_columns(
        {"input_image": "before", "edit_prompt": "instruction", "edited_image": "after"}
    )
    (tmp_path / "data").mkdir()
    pq.write_table(renamed, tmp_path / "data" / "train-00000-of-00001.parquet")
    columns = Columns(input="before", prompt="instruction", edited="after")
    dataset = load_edit_dataset(str(tmp_path), columns=columns)
    assert len(dataset) == table.num_rows
    assert dataset.row(0).prompt == table.column("edit_prompt")[0].as_py()
    with pytest.raises(KeyError, match="before"):
        load_edit_dataset(str(export_dir), columns=columns)


def test_sizes_come_from_headers_without_decoding(export_dir, monkeypatch):
    fresh = load_edit_dataset(str(export_dir))

    def no_decode(self):
        raise AssertionError("decoded pixels to read a size")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert fresh.sizes() == [SIZES[i % 3] for i in range(12)]
    assert fresh.size(4) == SIZES[1]


def test_size_is_upright_for_exif_orientation():
    from services.gpu_worker.finetune.data import _header_size

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown as 30 x 40
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30)).save(buffer, format=fmt, exif=exif.tobytes())
        assert _header_size(buffer.getvalue()) == (30, 40), fmt


def test_split_holdout_is_deterministic_and_disjoint(dataset):
    train, holdout = split_holdout(dataset, 3, seed=7)
    assert (train, holdout) == split_holdout(len(dataset), 3, seed=7)
    assert len(holdout) == 3 and len(train) == 9
    assert sorted(train + holdout) == list(range(12))
    assert split_holdout(dataset, 3, seed=8) != (train, holdout)
    subset = dataset.subset(holdout)
    assert [subset.row(i).prompt for i in range(3)] == [dataset.row(i).prompt for i in holdout]
    assert subset.sizes() == [dataset.size(i) for i in holdout]
    with pytest.raises(ValueError):
        split_holdout(dataset, 13, seed=0)


# --- Sampling --------------------------------------------------------------------------

MANY_SIZES = [(640, 480), (480, 640), (512, 512), (1024, 512), (300, 900), (700, 600)] * 9


def take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_buckets_are_the_engines_and_batches_share_one():
    sampler = BucketSampler(MANY_SIZES, 512, batch_size=4, seed=0)
    assert sampler.row_buckets == [bucket_for(w, h, 512) for w, h in MANY_SIZES]
    for batch in take(sampler, 3 * len(sampler)):
        assert 1 <= len(batch) <= 4
        assert len({sampler.row_buckets[i] for i in batch}) == 1
        assert sampler.bucket_of(batch) == bucket_for(*MANY_SIZES[batch[0]], 512)


def test_an_epoch_covers_every_row_once():
    sampler = BucketSampler(MANY_SIZES, 512, batch_size=4, seed=3)
    epoch = take(sampler, len(sampler))
    assert sorted(itertools.chain(*epoch)) == list(range(len(MANY_SIZES)))
    assert sampler.state_dict() == {"epoch": 0, "position": len(sampler), "seed": 3}
    sampler.next_batch()
    assert sampler.state_dict()["epoch"] == 1
    dropped = BucketSampler(MANY_SIZES, 512, batch_size=4, seed=3, drop_last=True)
    assert all(len(batch) == 4 for batch in take(dropped, 2 * len(dropped)))


def test_shuffle_is_per_epoch_and_seeded():
    a = BucketSampler(MANY_SIZES, 512, batch_size=4, seed=1)
    b = BucketSampler(MANY_SIZES, 512, batch_size=4, seed=1)
    c = BucketSampler(MANY_SIZES, 512, batch_size=4, seed=2)
    n = len(a)
    first, second = take(a, n), take(a, n)
    assert first == take(b, n) and second == take(b, n)
    assert first != second  # reshuffled each epoch
    assert first != take(c, n)
    assert list(itertools.islice(iter(BucketSampler(MANY_SIZES, 512, 4, seed=1)), n)) == first


def test_ranks_get_disjoint_balanced_batches():
    world = 3
    samplers = [
        BucketSampler(MANY_SIZES, 512, batch_size=4, seed=5, world_size=world, rank=r)
        for r in range(world)
    ]
    single = BucketSampler(MANY_SIZES, 512, batch_size=4, seed=5)
    assert len({len(s) for s in samplers}) == 1
    assert len(samplers[0]) == len(single) // world
    for _ in range(2):  # epochs
        epochs = [take(s, len(s)) for s in samplers]
        rows = [set(itertools.chain(*e)) for e in epochs]
        for x, y in itertools.combinations(rows, 2):
            assert not x & y
        assert sum(map(len, rows)) <= len(MANY_SIZES)
        # Together, the ranks' batches are batches of the unsharded sampler.
        all_batches = take(single, len(single))
        assert all(b in all_batches for e in epochs for b in e)


def test_a_restored_sampler_continues_exactly():
    sampler = BucketSampler(MANY_SIZES, 512, batch_size=4, seed=9, world_size=2, rank=1)
    n = len(sampler)
    take(sampler, n + 3)  # into the second epoch
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = take(sampler, 2 * n)
    restored = BucketSampler(MANY_SIZES, 512, batch_size=4, seed=0, world_size=2, rank=1)
    restored.load_state_dict(state)
    assert take(restored, 2 * n) == expected
    # Also at an epoch boundary.
    boundary = BucketSampler(MANY_SIZES, 512, batch_size=4, seed=9, world_size=2, rank=1)
    take(boundary, n)
    state = boundary.state_dict()
    expected = take(boundary, n)
    restored.load_state_dict(state)
    assert take(restored, n) == expected


def test_too_few_rows_for_a_batch_per_rank():
    with pytest.raises(ValueError, match="no batch"):
        BucketSampler([(64, 64)], 512, batch_size=2, seed=0, drop_last=True)
    with pytest.raises(ValueError, match="no batch"):
        BucketSampler([(64, 64)], 512, batch_size=1, seed=0, world_size=2, rank=0)


# --- Collation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        "make the square on the left red",
        "Recolor the RIGHT handle",
        "paint the leftmost cup",
        "the rightmost one",
        "his left-hand glove",
        "rotate it clockwise",
        "move it to the left.",
    ],
)
def test_side_words(prompt):
    assert has_side_words(prompt)


@pytest.mark.parametrize(
    "prompt", ["make the square red", "brighten it", "add a copyright notice", "lefty", ""]
)
def test_no_side_words(prompt):
    assert not has_side_words(prompt)


def gradient_row(prompt, size=(60, 40)):
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float64)
    source = np.stack([np.tile(x, (height, 1))] * 3, axis=-1).astype(np.uint8)
    edited = source.copy()
    edited[..., 0] = 255 - edited[..., 0]
    return EditRow(Image.fromarray(source), Image.fromarray(edited), prompt)


def test_collate_shapes_ranges_and_crop():
    rows = [gradient_row("make it red", (60, 40)), gradient_row("make it red", (40, 60))]
    batch = collate(rows, (64, 32), flip_rng=None)
    for key in ("original_pixel_values", "edited_pixel_values"):
        values = batch[key]
        assert values.shape == (2, 3, 32, 64) and values.dtype == torch.float32
        assert values.min() >= -1.0 and values.max() <= 1.0
    assert batch["prompts"] == ["make it red", "make it red"]
    assert batch["bucket"] == (64, 32) and batch["flipped"] == [False, False]
    # Aspect kept: the wide row's gradient spans the whole width (no squash to a crop of
    # columns), and the centre crop of the tall one keeps its full width too.
    original = batch["original_pixel_values"][0, 0, 16]
    assert original[0] < -0.9 and original[-1] > 0.9
    # The same transform for both pictures: edited red is the inverse of the input's.
    torch.testing.assert_close(
        batch["edited_pixel_values"][:, 0], -batch["original_pixel_values"][:, 0], atol=0.02, rtol=0
    )


def test_flips_only_without_side_words_and_alike_for_both_pictures():
    plain = [gradient_row("make it red") for _ in range(16)]
    sided = [gradient_row("make the left one red") for _ in range(16)]
    batch = collate(plain + sided, (64, 64), flip_rng=random.Random(0), flip_p=0.5)
    flipped = batch["flipped"]
    assert not any(flipped[16:])
    assert 0 < sum(flipped[:16]) < 16
    original = batch["original_pixel_values"]
    edited = batch["edited_pixel_values"]
    for i, flip in enumerate(flipped):
        row = original[i, 1, 32]
        assert (row[0] > row[-1]) == flip  # the gradient runs right to left when mirrored
        torch.testing.assert_close(edited[i, 1], original[i, 1])  # green unchanged
        torch.testing.assert_close(edited[i, 0], -original[i, 0], atol=0.02, rtol=0)
    none = collate(plain, (64, 64), flip_rng=random.Random(0), flip_p=0.0)
    assert not any(none["flipped"])


def test_edit_batches_resume_with_the_same_flips(dataset):
    def batches():
        sampler = BucketSampler(dataset.sizes(), 64, batch_size=2, seed=4)
        return EditBatches(dataset, sampler, flip_seed=11)

    it = batches()
    first = next(it)
    bucket = first["bucket"]
    assert first["original_pixel_values"].shape[-2:] == (bucket[1], bucket[0])
    assert all(bucket_for(*dataset.size(i), 64) == bucket for i in first["indices"])
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.state_dict()))
    expected = [next(it) for _ in range(8)]
    assert any(any(b["flipped"]) for b in expected)
    for batch in expected:
        for index, flip in zip(batch["indices"], batch["flipped"], strict=True):
            assert not (flip and has_side_words(dataset.row(index).prompt))
    restored = batches()
    restored.load_state_dict(state)
    for want in expected:
        got = next(restored)
        assert got["indices"] == want["indices"] and got["flipped"] == want["flipped"]
        assert torch.equal(got["original_pixel_values"], want["original_pixel_values"])
        assert torch.equal(got["edited_pixel_values"], want["edited_pixel_values"])


def test_edit_batches_check_the_sampler_matches(dataset):
    sampler = BucketSampler([(64, 64)] * 3, 64, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="rows"):
        EditBatches(dataset, sampler, flip_seed=None)
    assert isinstance(dataset, EditDataset)
