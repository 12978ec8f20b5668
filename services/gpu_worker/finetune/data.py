"""Training data for fine-tuning: edit pairs from a datagen export, in aspect buckets.

A dataset is (input image, edit prompt, edited image) rows, in the layout
``services/datagen/dataset_export.py`` writes (the column names of diffusers'
``train_instruct_pix2pix.py``; images as ``{bytes, path}`` structs). It is read from

* a local directory of an export (``<dir>/data/train-*.parquet``, else every ``*.parquet``
  below it), a Parquet file, or a glob of Parquet files;
* a storage URL of an export, ``file://<dir>`` or ``s3://bucket/prefix``
  (``services.common.storage``: the shards are listed and read through ``Storage.get``);
* anything else ``datasets.load_dataset`` takes: a Hub id, or a builder name such as
  ``"parquet"`` with ``data_files=``.

Rows stay encoded in a pyarrow table (memory-mapped for local files) and are decoded on
access, the way the engine reads an upload (``prepare_input``: EXIF orientation, ICC to
sRGB, transparency on white). ``EditDataset.size`` reads only the image header.

Unlike diffusers' script, which squashes every picture to a square, training runs at the
engine's own resolution buckets (``services.common.buckets``): ``BucketSampler`` puts each
row in the bucket ``bucket_for`` gives it, so every batch has one shape, and ``collate``
scales each pair to cover its bucket and crops the centre. The sampler shuffles per epoch
from a seed, shards batches across data-parallel ranks, and resumes exactly from its
``state_dict``; ``EditBatches`` adds the random horizontal flip's RNG to that state.
Pictures are flipped only when the prompt names no side ("the handle on the left").
"""

from __future__ import annotations

import glob as globlib
import io
import math
import random
import re
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import ExifTags, Image

from services.common.buckets import bucket_for
from services.common.images import prepare_input, upright_size

__all__ = [
    "BucketSampler",
    "Columns",
    "EditBatches",
    "EditDataset",
    "EditRow",
    "collate",
    "has_side_words",
    "load_edit_dataset",
    "split_holdout",
]

RESAMPLE = Image.Resampling.LANCZOS  # what the engine scales inputs to their bucket with


@dataclass(frozen=True, slots=True)
class Columns:
    """Names of the dataset's columns (diffusers' ``--original_image_column`` etc.)."""

    input: str = "input_image"
    prompt: str = "edit_prompt"
    edited: str = "edited_image"


@dataclass(frozen=True, slots=True)
class EditRow:
    input: Image.Image  # RGB, upright sRGB
    edited: Image.Image  # RGB, upright sRGB
    prompt: str


# --- Reading ---------------------------------------------------------------------------


def _image_bytes(value: Any, *, base: Path | None = None) -> bytes:
    """The encoded picture of one cell: an Image struct ``{bytes, path}``, raw bytes, or a
    path (read from disk; relative paths against ``base``)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str) and value:
        path = Path(value)
        if not path.is_absolute() and base is not None:
            path = base / path
        return path.read_bytes()
    raise ValueError(f"an image cell holds neither bytes nor a path: {type(value).__name__}")


def _header_size(data: bytes) -> tuple[int, int]:
    """The upright (width, height) of an encoded picture from its header: no pixel is
    decoded. (Pillow's PNG ``getexif`` decodes the whole file to look for an eXIf chunk
    after the pixels; here only one before them, where writers put it, counts.)"""
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG":
            return upright_size(image)
        raw = image.info.get("exif")
        if not raw:
            return image.size
        exif = Image.Exif()
        exif.load(raw)
        orientation = exif.get(ExifTags.Base.Orientation, 1)
        return (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return prepare_input(image)


class EditDataset:
    """Rows of a pyarrow table, decoded on access. ``subset`` gives a view of some rows."""

    def __init__(
        self,
        table: pa.Table,
        columns: Columns = Columns(),
        *,
        indices: Sequence[int] | None = None,
        base: Path | None = None,
    ) -> None:
        error = _missing(columns, table.column_names)
        if error is not None:
            raise error
        self.columns = columns
        # Only the three columns are kept (no copy: the arrays are shared).
        self.table = table.select([columns.input, columns.prompt, columns.edited])
        self._input = self.table.column(0)
        self._prompt = self.table.column(1)
        self._edited = self.table.column(2)
        self._indices = list(range(table.num_rows)) if indices is None else list(indices)
        self._base = base
        self._sizes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self._indices)

    def subset(self, indices: Sequence[int]) -> EditDataset:
        """The rows ``indices`` (positions in this dataset) as a dataset of their own."""
        view = EditDataset.__new__(EditDataset)
        view.columns, view.table = self.columns, self.table
        view._input, view._prompt, view._edited = self._input, self._prompt, self._edited
        view._indices = [self._indices[i] for i in indices]
        view._base = self._base
        view._sizes = None if self._sizes is None else [self._sizes[i] for i in indices]
        return view

    def _cell(self, column: pa.ChunkedArray, i: int) -> Any:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of a dataset of {len(self)}")
        return column[self._indices[i]].as_py()

    def prompt(self, i: int) -> str:
        return str(self._cell(self._prompt, i) or "")

    def row(self, i: int) -> EditRow:
        return EditRow(
            input=_decode(_image_bytes(self._cell(self._input, i), base=self._base)),
            edited=_decode(_image_bytes(self._cell(self._edited, i), base=self._base)),
            prompt=self.prompt(i),
        )

    def __getitem__(self, i: int) -> EditRow:
        return self.row(i)

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) of row i's input as the model sees it (upright), from the
        header only."""
        if self._sizes is not None:
            return self._sizes[i]
        return _header_size(_image_bytes(self._cell(self._input, i), base=self._base))

    def sizes(self) -> list[tuple[int, int]]:
        """Every row's ``size``, read once and kept (what ``BucketSampler`` takes)."""
        if self._sizes is None:
            self._sizes = [self.size(i) for i in range(len(self))]
        return list(self._sizes)


def _concat(tables: list[pa.Table]) -> pa.Table:
    if not tables:
        raise FileNotFoundError("no Parquet shards")
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def _pick_shards(names: list[str], split: str) -> list[str]:
    """The split's shards (``data/<split>-*.parquet``) if any, else every Parquet file."""
    parquet = sorted(name for name in names if name.endswith(".parquet"))
    pattern = re.compile(rf"(^|/)data/{re.escape(split)}-[^/]*\.parquet$")
    return [name for name in parquet if pattern.search(name)] or parquet


def _missing(columns: Columns, available: Sequence[str]) -> KeyError | None:
    missing = [
        name for name in (columns.input, columns.prompt, columns.edited) if name not in available
    ]
    if not missing:
        return None
    return KeyError(
        f"the dataset has no column {', '.join(map(repr, missing))}; it has {list(available)}"
    )


def _read_parquet(source: Any, columns: Columns, *, memory_map: bool = False) -> pa.Table:
    """Only the three columns of one Parquet file (a path or a pyarrow buffer reader)."""
    shard = pq.ParquetFile(source, memory_map=memory_map)
    error = _missing(columns, shard.schema_arrow.names)
    if error is not None:
        raise error
    return shard.read(columns=[columns.input, columns.prompt, columns.edited])


def _from_local(source: str, columns: Columns, split: str) -> EditDataset | None:
    path = Path(source).expanduser()
    if path.is_dir():
        files = _pick_shards(
            [p.relative_to(path).as_posix() for p in path.rglob("*.parquet")], split
        )
        files = [str(path / f) for f in files]
        base = path
    elif path.is_file():
        files, base = [str(path)], path.parent
    elif any(ch in source for ch in "*?["):
        files = sorted(globlib.glob(str(path), recursive=True))
        base = Path(files[0]).parent if files else None
    else:
        return None
    if not files:
        raise FileNotFoundError(f"no Parquet files in {source}")
    tables = [_read_parquet(f, columns, memory_map=True) for f in files]
    return EditDataset(_concat(tables), columns, base=base)


def _from_storage(source: str, columns: Columns, split: str, settings) -> EditDataset:
    from services.common.settings import Settings
    from services.common.storage import open_storage

    if settings is None:
        settings = Settings(storage_url=source)
    else:
        settings = settings.model_copy(update={"storage_url": source})
    storage = open_storage(settings)
    keys = _pick_shards(storage.list(""), split)
    if not keys:
        raise FileNotFoundError(f"no Parquet shards under {source}")
    tables = [_read_parquet(pa.BufferReader(storage.get(key)), columns) for key in keys]
    return EditDataset(_concat(tables), columns)


def _from_hf(source: str, columns: Columns, split: str, **options: Any) -> EditDataset:
    import datasets

    loaded = datasets.load_dataset(source, split=split, **options)
    # The Arrow data under the features: images stay {bytes, path} structs (not decoded).
    table = loaded.flatten_indices().data.table
    return EditDataset(table, columns)


def load_edit_dataset(
    source: str,
    *,
    columns: Columns = Columns(),
    split: str = "train",
    storage_settings=None,
    **load_dataset_options: Any,
) -> EditDataset:
    """The edit pairs of ``source``: a local export directory, Parquet file or glob; a
    storage URL (``file://`` or ``s3://``; ``storage_settings`` gives the S3 endpoint and
    region, else the environment's ``Settings``); or a ``datasets.load_dataset`` path (a Hub
    id, or e.g. ``"parquet"`` with ``data_files=``; extra keywords go to it)."""
    if not load_dataset_options:
        if source.startswith(("file://", "s3://")):
            return _from_storage(source, columns, split, storage_settings)
        local = _from_local(source, columns, split)
        if local is not None:
            return local
    return _from_hf(source, columns, split, **load_dataset_options)


def split_holdout(dataset: Sized | int, n: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, holdout indices), both sorted: ``n`` rows drawn with ``seed``."""
    total = dataset if isinstance(dataset, int) else len(dataset)
    if not 0 <= n <= total:
        raise ValueError(f"cannot hold out {n} of {total} rows")
    order = list(range(total))
    random.Random(f"holdout:{seed}").shuffle(order)
    return sorted(order[n:]), sorted(order[:n])


# --- Batching --------------------------------------------------------------------------


class BucketSampler:
    """Batches of row indices, all rows of a batch in one resolution bucket.

    Each epoch, the rows of every bucket are shuffled and cut into batches (the last one
    of a bucket shorter, or dropped with ``drop_last``), and the batches are shuffled, all
    from ``seed`` and the epoch number. With ``world_size`` ranks, rank r takes batches r,
    r + world_size, ... and every rank the same number: the at most world_size - 1 batches
    left over are skipped that epoch (others the next). Iteration never ends; it goes on
    from ``state_dict()`` (the next batch to yield), so a restored sampler continues
    exactly where the saved one was.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        resolution: int,
        batch_size: int,
        seed: int,
        drop_last: bool = False,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world size {world_size}")
        self.resolution = resolution
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.world_size = world_size
        self.rank = rank
        # The bucket of every row, and the rows of every bucket.
        self.row_buckets: list[tuple[int, int]] = [bucket_for(w, h, resolution) for w, h in sizes]
        self.bucket_rows: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.row_buckets):
            self.bucket_rows.setdefault(bucket, []).append(index)
        per_bucket = (
            (len(rows) // batch_size if drop_last else math.ceil(len(rows) / batch_size))
            for rows in self.bucket_rows.values()
        )
        self.batches_per_epoch = sum(per_bucket) // world_size  # per rank
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{len(self.row_buckets)} rows in {len(self.bucket_rows)} buckets make no "
                f"batch of {batch_size} for each of {world_size} ranks"
            )
        self.epoch = 0
        self.position = 0  # batches of this epoch already yielded (on this rank)
        self._plan: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.batches_per_epoch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``, in order."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        rng = random.Random(f"bucket-sampler:{self.seed}:{epoch}")
        batches: list[list[int]] = []
        for bucket in sorted(self.bucket_rows):
            rows = list(self.bucket_rows[bucket])
            rng.shuffle(rows)
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        mine = batches[self.rank :: self.world_size][: self.batches_per_epoch]
        self._plan = (epoch, mine)
        return mine

    def bucket_of(self, batch: Sequence[int]) -> tuple[int, int]:
        return self.row_buckets[batch[0]]

    def next_batch(self) -> list[int]:
        plan = self.epoch_batches(self.epoch)
        if self.position >= len(plan):
            self.epoch, self.position = self.epoch + 1, 0
            plan = self.epoch_batches(self.epoch)
        batch = plan[self.position]
        self.position += 1
        return list(batch)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._plan = None


# --- Collation -------------------------------------------------------------------------

# Words that name a side: mirroring the picture would contradict the prompt.
_SIDE_WORDS = re.compile(
    r"\b(?:left|right|leftmost|rightmost|left-hand|right-hand|lefthand|righthand|"
    r"leftwards?|rightwards?|left-most|right-most|left-side|right-side|"
    r"clockwise|counterclockwise|counter-clockwise|anticlockwise|anti-clockwise)\b",
    re.IGNORECASE,
)


def has_side_words(prompt: str) -> bool:
    """Whether ``prompt`` names a side or a turning direction, so that a mirrored pair
    would no longer match it ("the cup on the left", "rotate it clockwise")."""
    return _SIDE_WORDS.search(prompt) is not None


def _cover_crop(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """``image`` scaled, keeping its aspect ratio, to cover ``bucket``; centre cropped."""
    width, height = bucket
    if image.size == bucket:
        return image
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(scaled, RESAMPLE)
    left = (scaled[0] - width) // 2
    top = (scaled[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def collate(
    rows: Sequence[EditRow],
    bucket: tuple[int, int],
    *,
    flip_rng: random.Random | None,
    flip_p: float = 0.5,
) -> dict[str, Any]:
    """A batch at ``bucket`` (width, height): ``original_pixel_values`` and
    ``edited_pixel_values`` (B, 3, H, W) in [-1, 1], ``prompts``, ``bucket``, ``flipped``.

    Both pictures of a row get the same transform (an edited picture of another size is
    first scaled to its input's). A row is mirrored with probability ``flip_p`` (drawn
    from ``flip_rng``; None: never) unless its prompt names a side."""
    originals, edits, flipped = [], [], []
    for row in rows:
        source, edited = row.input.convert("RGB"), row.edited.convert("RGB")
        if edited.size != source.size:
            edited = edited.resize(source.size, RESAMPLE)
        source, edited = _cover_crop(source, bucket), _cover_crop(edited, bucket)
        flip = (
            flip_rng is not None and not has_side_words(row.prompt) and flip_rng.random() < flip_p
        )
        if flip:
            source = source.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            edited = edited.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        originals.append(_to_tensor(source))
        edits.append(_to_tensor(edited))
        flipped.append(flip)
    return {
        "original_pixel_values": torch.stack(originals),
        "edited_pixel_values": torch.stack(edits),
        "prompts": [row.prompt for row in rows],
        "bucket": tuple(bucket),
        "flipped": flipped,
    }


class EditBatches:
    """Collated batches of ``dataset`` in the order of ``sampler``, forever; each batch
    also holds its row ``indices``. ``state_dict()`` covers the sampler and the flip RNG,
    so a run restored from it gets the same batches with the same flips."""

    def __init__(
        self,
        dataset: EditDataset,
        sampler: BucketSampler,
        *,
        flip_seed: int | None,
        flip_p: float = 0.5,
    ) -> None:
        """``flip_seed`` None: no flips."""
        if len(sampler.row_buckets) != len(dataset):
            raise ValueError(
                f"the sampler has {len(sampler.row_buckets)} rows, the dataset {len(dataset)}"
            )
        self.dataset = dataset
        self.sampler = sampler
        self.flip_p = flip_p
        self.flip_rng = None if flip_seed is None else random.Random(f"flip:{flip_seed}")

    def __iter__(self) -> EditBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        indices = self.sampler.next_batch()
        batch = collate(
            [self.dataset.row(i) for i in indices],
            self.sampler.bucket_of(indices),
            flip_rng=self.flip_rng,
            flip_p=self.flip_p,
        )
        batch["indices"] = indices
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and lists (JSON and ``torch.load(weights_only=True)`` safe)."""
        flip = None
        if self.flip_rng is not None:
            version, internal, gauss = self.flip_rng.getstate()
            flip = {"version": version, "internal": list(internal), "gauss": gauss}
        return {"sampler": self.sampler.state_dict(), "flip_rng": flip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        flip = state.get("flip_rng")
        if flip is not None:
            if self.flip_rng is None:
                self.flip_rng = random.Random()
            self.flip_rng.setstate((flip["version"], tuple(flip["internal"]), flip["gauss"]))
