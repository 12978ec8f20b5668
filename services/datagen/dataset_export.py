"""The image-pair dataset as Parquet shards in the Hugging Face ``datasets`` layout.

    <prefix>/data/train-00000-of-00003.parquet
    <prefix>/data/train-00001-of-00003.parquet
    <prefix>/data/train-00002-of-00003.parquet
    <prefix>/dataset_card.md

One row per image pair. Images are PNG bytes in the ``datasets`` Image feature (a struct
``{bytes, path}``): pictures given as PNG bytes (pairs read back from storage) are copied
in unchanged, PIL images are encoded. The Parquet schema carries the ``huggingface``
features metadata, so ``datasets.load_dataset("parquet", data_files=...)`` decodes them
to PIL images, and the column names are the defaults of diffusers'
``train_instruct_pix2pix.py`` (``input_image``, ``edit_prompt``, ``edited_image``):
``--dataset_name <prefix folder>`` loads it. Uploaded as is (with the card as
``README.md``), the folder is a Hub dataset.

Shards are spooled to a local temporary directory while pairs arrive and go to storage
(a directory or S3, ``services.common.storage``) on ``close()``, when their number is
known; shards of an earlier export under the same prefix that this one did not write are
deleted, so the prefix always holds exactly one dataset. A writer left by an exception
(``with DatasetWriter(...)``) writes nothing to storage. An export of no pairs is one
shard with the schema and no rows (which pyarrow reads; ``datasets`` refuses empty splits).

The card's text is ``services/datagen/templates/dataset_card.md``; this module only
computes what goes into it. It needs pyarrow and PIL, not torch.
"""

from __future__ import annotations

import functools
import io
import json
import re
import string
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from services.common.storage import Storage
from services.datagen.pair_params import ImagePair

__all__ = [
    "CARD_NAME",
    "IMAGE_COLUMNS",
    "SCORE_COLUMNS",
    "DatasetWriter",
    "ExportSummary",
    "arrow_schema",
    "dataset_card",
    "export_dataset",
    "pair_record",
]

CARD_NAME = "dataset_card.md"
IMAGE_COLUMNS = ("input_image", "edited_image")
SCORE_COLUMNS = ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")
DEFAULT_MAX_SHARD_BYTES = 256 * 2**20
DEFAULT_ROW_GROUP_SIZE = 100
PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# (column, arrow type, datasets feature), in column order.
_COLUMNS: tuple[tuple[str, pa.DataType, dict[str, str]], ...] = (
    ("input_image", _IMAGE, {"_type": "Image"}),
    ("edit_prompt", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("edited_image", _IMAGE, {"_type": "Image"}),
    ("input_caption", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("output_caption", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("category", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("edit_type", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("seed", pa.int64(), {"dtype": "int64", "_type": "Value"}),
    ("p", pa.float64(), {"dtype": "float64", "_type": "Value"}),
    ("text_guidance", pa.float64(), {"dtype": "float64", "_type": "Value"}),
    ("row_index", pa.int64(), {"dtype": "int64", "_type": "Value"}),
    ("pair_index", pa.int64(), {"dtype": "int64", "_type": "Value"}),
)
_SCORE_FEATURE = {"dtype": "float64", "_type": "Value"}
# Dataset card dtypes of the features above.
_CARD_DTYPES = {"Image": "image", "string": "string", "int64": "int64", "float64": "float64"}


def _columns(with_scores: bool):
    columns = list(_COLUMNS)
    if with_scores:
        columns += [(name, pa.float64(), _SCORE_FEATURE) for name in SCORE_COLUMNS]
    return columns


def arrow_schema(with_scores: bool = False) -> pa.Schema:
    """The shards' schema, with the ``huggingface`` features metadata ``datasets`` reads."""
    columns = _columns(with_scores)
    features = {name: feature for name, _, feature in columns}
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema([(name, arrow_type) for name, arrow_type, _ in columns], metadata=metadata)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png(image) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        # Already encoded (stored by the builder): copied as is. Decoding and re-encoding
        # took ~0.2 s a picture, hours for a paper-sized dataset, and changed nothing.
        data = bytes(image)
        if not data.startswith(PNG_SIGNATURE):
            raise ValueError("image bytes are not a PNG file")
        return data
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pair_record(pair: ImagePair, with_scores: bool = False) -> dict[str, Any]:
    """One pair as a row of the dataset (images as PNG: PIL images encoded, PNG bytes
    copied unchanged)."""
    stem = f"{pair.row_index:07d}_{pair.pair_index:02d}"
    record: dict[str, Any] = {
        "input_image": {"bytes": _png(pair.input_image), "path": f"{stem}_input.png"},
        "edit_prompt": pair.instruction,
        "edited_image": {"bytes": _png(pair.edited_image), "path": f"{stem}_edited.png"},
        "input_caption": pair.input_caption,
        "output_caption": pair.output_caption,
        "category": pair.category,
        "edit_type": pair.edit_type,
        "seed": pair.seed,
        "p": pair.p,
        "text_guidance": pair.text_guidance,
        "row_index": pair.row_index,
        "pair_index": pair.pair_index,
    }
    if with_scores:
        if pair.scores is None:
            raise ValueError(
                f"pair {pair.pair_index} of row {pair.row_index} has no CLIP scores, "
                "but the dataset's first pair had them"
            )
        record.update({name: float(pair.scores[name]) for name in SCORE_COLUMNS})
    elif pair.scores is not None:
        raise ValueError(
            f"pair {pair.pair_index} of row {pair.row_index} has CLIP scores, "
            "but the dataset's first pair had none"
        )
    return record


@dataclass(frozen=True, slots=True)
class ExportSummary:
    num_rows: int
    shard_keys: tuple[str, ...]
    card_key: str
    num_bytes: int  # of all shards
    with_scores: bool
    # Pairs and distinct rows (caption pairs) per category and per edit type.
    pairs_per_category: Mapping[str, int] = field(default_factory=dict)
    pairs_per_edit_type: Mapping[str, int] = field(default_factory=dict)
    rows_per_category: Mapping[str, int] = field(default_factory=dict)
    rows_per_edit_type: Mapping[str, int] = field(default_factory=dict)


def _join(prefix: str, key: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


class DatasetWriter:
    """Streams pairs into Parquet shards; ``close()`` publishes them and the card.

    with DatasetWriter(storage, "datasets/run-1", generation={"model": ...}) as writer:
        for pair in pairs:
            writer.add(pair)
    summary = writer.summary
    """

    def __init__(
        self,
        storage: Storage,
        prefix: str = "",
        *,
        split: str = "train",
        with_scores: bool | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
        generation: Mapping[str, Any] | None = None,
        pretty_name: str = "InstructEdit product edits",
        license: str = "other",
    ) -> None:
        """``with_scores``: whether the CLIP score columns exist; None = as the first pair.
        ``max_shard_bytes``: a shard is closed once its encoded rows reach this size.
        ``generation``: parameters of the run, listed in the dataset card."""
        if max_shard_bytes < 1 or row_group_size < 1:
            raise ValueError("max_shard_bytes and row_group_size must be >= 1")
        self.storage = storage
        self.prefix = prefix.strip("/")
        self.split = split
        self.with_scores = with_scores
        self.max_shard_bytes = max_shard_bytes
        self.row_group_size = row_group_size
        self.generation = dict(generation or {})
        self.pretty_name = pretty_name
        self.license = license
        self.summary: ExportSummary | None = None

        self._tmp = tempfile.TemporaryDirectory(prefix="instructedit-parquet-")
        self._shards: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._shard_bytes = 0
        self._buffer: list[dict[str, Any]] = []
        self._num_rows = 0
        self._pairs: Counter[tuple[str, str]] = Counter()
        self._rows: set[tuple[int, str, str]] = set()
        self._closed = False

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def add(self, pair: ImagePair) -> None:
        if self._closed:
            raise RuntimeError("the dataset writer is closed")
        if self.with_scores is None:
            self.with_scores = pair.scores is not None
        record = pair_record(pair, self.with_scores)
        self._buffer.append(record)
        self._shard_bytes += sum(len(record[name]["bytes"]) for name in IMAGE_COLUMNS)
        self._num_rows += 1
        self._pairs[(pair.category, pair.edit_type)] += 1
        self._rows.add((pair.row_index, pair.category, pair.edit_type))
        if len(self._buffer) >= self.row_group_size:
            self._flush()
        if self._shard_bytes >= self.max_shard_bytes:
            self._end_shard()

    def add_many(self, pairs: Iterable[ImagePair]) -> None:
        for pair in pairs:
            self.add(pair)

    def _schema(self) -> pa.Schema:
        return arrow_schema(bool(self.with_scores))

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            path = Path(self._tmp.name) / f"shard-{len(self._shards):05d}.parquet"
            self._shards.append(path)
            self._writer = pq.ParquetWriter(path, self._schema())
        table = pa.Table.from_pylist(self._buffer, schema=self._schema())
        self._writer.write_table(table, row_group_size=self.row_group_size)
        self._buffer = []

    def _end_shard(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._shard_bytes = 0

    def shard_key(self, index: int, count: int) -> str:
        return _join(self.prefix, f"data/{self.split}-{index:05d}-of-{count:05d}.parquet")

    def close(self) -> ExportSummary:
        """Finish the last shard, upload shards and card, remove stale shards."""
        if self.summary is not None:
            return self.summary
        self._closed = True
        try:
            self._end_shard()
            if not self._shards:
                # An empty dataset still loads: one shard with the schema and no row group
                # (datasets cannot read a row group of 0 rows).
                path = Path(self._tmp.name) / "shard-00000.parquet"
                pq.ParquetWriter(path, self._schema()).close()
                self._shards.append(path)
            count = len(self._shards)
            keys = []
            num_bytes = 0
            for index, path in enumerate(self._shards):
                data = path.read_bytes()
                num_bytes += len(data)
                key = self.shard_key(index, count)
                self.storage.put(key, data, PARQUET_CONTENT_TYPE)
                keys.append(key)
                path.unlink()
            stale_prefix = _join(self.prefix, f"data/{self.split}-")
            for key in self.storage.list(stale_prefix):
                if key.endswith(".parquet") and key not in keys:
                    self.storage.delete(key)
            summary = self._summary(tuple(keys), num_bytes)
            self.storage.put(
                summary.card_key,
                dataset_card(
                    summary,
                    split=self.split,
                    generation=self.generation,
                    pretty_name=self.pretty_name,
                    license=self.license,
                ).encode("utf-8"),
                "text/markdown; charset=utf-8",
            )
            self.summary = summary
            return summary
        finally:
            self._tmp.cleanup()

    def discard(self) -> None:
        """Drop everything written so far; storage is left untouched."""
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._buffer = []
        self._tmp.cleanup()

    def _summary(self, keys: tuple[str, ...], num_bytes: int) -> ExportSummary:
        pairs_category: Counter[str] = Counter()
        pairs_edit: Counter[str] = Counter()
        for (category, edit_type), count in self._pairs.items():
            pairs_category[category] += count
            pairs_edit[edit_type] += count
        rows_category = Counter(category for _, category, _ in self._rows)
        rows_edit = Counter(edit_type for _, _, edit_type in self._rows)
        return ExportSummary(
            num_rows=self._num_rows,
            shard_keys=keys,
            card_key=_join(self.prefix, CARD_NAME),
            num_bytes=num_bytes,
            with_scores=bool(self.with_scores),
            pairs_per_category=dict(sorted(pairs_category.items())),
            pairs_per_edit_type=dict(sorted(pairs_edit.items())),
            rows_per_category=dict(sorted(rows_category.items())),
            rows_per_edit_type=dict(sorted(rows_edit.items())),
        )


def export_dataset(
    pairs: Iterable[ImagePair], storage: Storage, prefix: str = "", **options: Any
) -> ExportSummary:
    """Write ``pairs`` as a dataset under ``prefix`` (options: see ``DatasetWriter``)."""
    with DatasetWriter(storage, prefix, **options) as writer:
        writer.add_many(pairs)
    return writer.summary


def _size_category(rows: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
    ):
        if rows < limit:
            return name
    return "10M<n<100M"


CARD_TEMPLATE = "dataset_card.md"
# The parts of the card template and the placeholders each may use.
_CARD_PARTS: dict[str, frozenset[str]] = {
    "card": frozenset(
        {
            "header",
            "pretty_name",
            "num_pairs",
            "num_caption_rows",
            "num_shards",
            "split",
            "scores_note",
            "category_rows",
            "edit_type_rows",
        }
    ),
    "clip_scores_note": frozenset(),
    "no_clip_scores_note": frozenset(),
    "count_row": frozenset({"name", "pairs", "caption_rows"}),
    "total_row": frozenset({"pairs", "caption_rows"}),
    "generation": frozenset({"rows"}),
    "generation_row": frozenset({"name", "value"}),
}
_PART_LINE = re.compile(r"^<!-- part: (\S+) -->\n", re.MULTILINE)


@functools.cache
def _card_template() -> Mapping[str, string.Template]:
    """The parts of the packaged card template."""
    source = resources.files("services.datagen") / "templates" / CARD_TEMPLATE
    return card_template_parts(
        source.read_text(encoding="utf-8"), f"services/datagen/templates/{CARD_TEMPLATE}"
    )


def card_template_parts(text: str, where: str = CARD_TEMPLATE) -> Mapping[str, string.Template]:
    """Split a card template into its parts, checked against ``_CARD_PARTS``."""
    # Text above the first part line is a note to the reader, not part of the card.
    _, *named = _PART_LINE.split(text)
    names, bodies = named[::2], named[1::2]
    if sorted(names) != sorted(_CARD_PARTS):
        raise ValueError(f"{where}: has the parts {names}, expected {sorted(_CARD_PARTS)}")
    parts = {}
    for name, body in zip(names, bodies, strict=True):
        part = string.Template(body.removesuffix("\n"))
        unknown = set(part.get_identifiers()) - _CARD_PARTS[name]
        if not part.is_valid() or unknown:
            raise ValueError(
                f"{where}: part {name!r} has a bad or unknown placeholder {sorted(unknown)}; "
                f"it may use {sorted(_CARD_PARTS[name])} (write $$ for a dollar sign)"
            )
        parts[name] = part
    return MappingProxyType(parts)


def _count_rows(pairs: Mapping[str, int], rows: Mapping[str, int]) -> str:
    """Table rows of pairs and caption rows per name, and their total."""
    parts = _card_template()
    lines = [
        parts["count_row"].substitute(name=name, pairs=count, caption_rows=rows.get(name, 0))
        for name, count in pairs.items()
    ]
    lines.append(
        parts["total_row"].substitute(pairs=sum(pairs.values()), caption_rows=sum(rows.values()))
    )
    return "\n".join(lines)


def dataset_card(
    summary: ExportSummary,
    *,
    split: str = "train",
    generation: Mapping[str, Any] | None = None,
    pretty_name: str = "InstructEdit product edits",
    license: str = "other",
) -> str:
    """A Hugging Face dataset card (YAML header + Markdown) for an export."""
    features = [
        {"name": name, "dtype": _CARD_DTYPES[feature.get("dtype", feature["_type"])]}
        for name, _, feature in _columns(summary.with_scores)
    ]
    header = {
        "pretty_name": pretty_name,
        "license": license,
        "language": ["en"],
        "task_categories": ["image-to-image"],
        "tags": ["image-editing", "instruct-pix2pix", "synthetic", "product-photos"],
        "size_categories": [_size_category(summary.num_rows)],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"data/{split}-*"}],
            }
        ],
        "dataset_info": {
            "features": features,
            "splits": [
                {"name": split, "num_bytes": summary.num_bytes, "num_examples": summary.num_rows}
            ],
            "download_size": summary.num_bytes,
            "dataset_size": summary.num_bytes,
        },
    }
    parts = _card_template()
    note = "clip_scores_note" if summary.with_scores else "no_clip_scores_note"
    sections = [
        parts["card"].substitute(
            header=yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(),
            pretty_name=pretty_name,
            num_pairs=summary.num_rows,
            num_caption_rows=sum(summary.rows_per_category.values()),
            num_shards=len(summary.shard_keys),
            split=split,
            scores_note=parts[note].substitute(),
            category_rows=_count_rows(summary.pairs_per_category, summary.rows_per_category),
            edit_type_rows=_count_rows(summary.pairs_per_edit_type, summary.rows_per_edit_type),
        )
    ]
    if generation:
        rows = "\n".join(
            # f-string rendering, as the card always had (str() differs for some enums).
            parts["generation_row"].substitute(name=name, value=f"{value}")
            for name, value in generation.items()
        )
        sections.append(parts["generation"].substitute(rows=rows))
    return "\n".join(sections) + "\n"
