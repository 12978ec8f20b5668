"""Outputs pinned byte for byte against references recorded from earlier code.

Rows are a pure function of (rows, seed, catalog), and the dataset card of its
inputs; refactors (such as moving wordings from code into data files) must not
change a byte of either. The references were recorded before the instruction
wordings moved from ``edits.py`` to ``catalog/edits.yaml`` and the card from
code to ``templates/dataset_card.md``.

A deliberate change of wording or of the card changes them; re-record with

    python -m tests.datagen.test_reference_outputs

and review the diff of ``tests/datagen/data/`` (the verbatim first rows and
cards show what changed).

Text runs are stored compactly: the SHA-256 of the whole JSON Lines output and
one short hash per block of rows, so a mismatch names the first block that
differs and shows its new rows.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from services.datagen.dataset_export import ExportSummary, dataset_card
from services.datagen.text import Catalog, load_catalog, row_to_json, synthesize

from .conftest import write_catalog

DATA = Path(__file__).parent / "data"
TEXT_REFERENCE = DATA / "text_rows_reference.json"
BLOCK_ROWS = 10
FIRST_LINES = 2

# (catalog, rows, seed). "tiny" is conftest's tiny catalog, which brings no
# edits.yaml of its own; 286 rows is its whole space for seed 0.
TEXT_RUNS = (
    ("packaged", 3000, 0),
    ("packaged", 300, 1),
    ("packaged", 500, 2),
    ("tiny", 200, 4),
    ("tiny", 286, 0),
)

CARD_INPUTS = {
    "scored": (
        ExportSummary(
            num_rows=12,
            shard_keys=(
                "ds/data/validation-00000-of-00002.parquet",
                "ds/data/validation-00001-of-00002.parquet",
            ),
            card_key="ds/dataset_card.md",
            num_bytes=123456,
            with_scores=True,
            pairs_per_category={"apparel": 7, "toys": 5},
            pairs_per_edit_type={"color_change": 4, "text_print": 8},
            rows_per_category={"apparel": 3, "toys": 2},
            rows_per_edit_type={"color_change": 2, "text_print": 3},
        ),
        {
            "split": "validation",
            "generation": {
                "model": "tiny",
                "num_inference_steps": 3,
                "p_range": (0.1, 0.9),
                "filter": True,
            },
            "pretty_name": "Café edits: «test»",
            "license": "cc-by-4.0",
        },
    ),
    "empty": (
        ExportSummary(
            num_rows=0,
            shard_keys=("data/train-00000-of-00001.parquet",),
            card_key="dataset_card.md",
            num_bytes=0,
            with_scores=False,
        ),
        {},
    ),
    # Text that a template engine might read as its own syntax.
    "big": (
        ExportSummary(
            num_rows=2_000_000,
            shard_keys=("k0", "k1", "k2"),
            card_key="dataset_card.md",
            num_bytes=10**12,
            with_scores=False,
            pairs_per_category={"a|b": 1},
            pairs_per_edit_type={"x": 1},
            rows_per_category={},
            rows_per_edit_type={"x": 1},
        ),
        {"generation": {"seed": 0, "note": "100% {braces} $dollar ${x}"}},
    ),
}


def _card_path(name: str) -> Path:
    return DATA / f"dataset_card_{name}.md"


def _catalog(name: str, tmp_dir: Path) -> Catalog:
    return load_catalog() if name == "packaged" else load_catalog(write_catalog(tmp_dir))


def _lines(catalog: Catalog, rows: int, seed: int) -> list[str]:
    # Exactly what `python -m services.datagen text` writes, line by line.
    return [row_to_json(row) + "\n" for row in synthesize(rows, seed, catalog)]


def _sha256(lines: list[str]) -> str:
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def _blocks(lines: list[str]) -> list[str]:
    return [
        _sha256(lines[start : start + BLOCK_ROWS])[:8] for start in range(0, len(lines), BLOCK_ROWS)
    ]


def _record(catalog_name: str, rows: int, seed: int, lines: list[str]) -> dict:
    return {
        "catalog": catalog_name,
        "rows": rows,
        "seed": seed,
        "sha256": _sha256(lines),
        "block_sha256_prefixes": " ".join(_blocks(lines)),
        "first_lines": lines[:FIRST_LINES],
    }


def _reference_runs() -> dict[tuple[str, int, int], dict]:
    runs = json.loads(TEXT_REFERENCE.read_text(encoding="utf-8"))["runs"]
    return {(run["catalog"], run["rows"], run["seed"]): run for run in runs}


def _first_difference(reference: dict, lines: list[str]) -> str:
    if len(lines) != reference["rows"]:
        return f"{len(lines)} rows instead of {reference['rows']}"
    for index, line in enumerate(reference["first_lines"]):
        if lines[index] != line:
            return f"row {index} is now\n{lines[index]}instead of\n{line}"
    for block, (now, then) in enumerate(
        zip(_blocks(lines), reference["block_sha256_prefixes"].split(), strict=True)
    ):
        if now != then:
            start = block * BLOCK_ROWS
            shown = [
                f"  {row['index']} {row['edit_type']}: {row['instruction']!r} "
                f"on {row['input_caption']!r}"
                for row in map(json.loads, lines[start : start + BLOCK_ROWS])
            ]
            return f"rows {start}-{start + len(shown) - 1} differ; they now read\n" + "\n".join(
                shown
            )
    return "the blocks match but the whole file does not"


@pytest.mark.parametrize(("catalog_name", "rows", "seed"), TEXT_RUNS)
def test_rows_are_byte_identical_to_the_reference(tmp_path, catalog_name, rows, seed):
    reference = _reference_runs()[(catalog_name, rows, seed)]
    lines = _lines(_catalog(catalog_name, tmp_path), rows, seed)
    assert _sha256(lines) == reference["sha256"], (
        f"{catalog_name} catalog, {rows} rows, seed {seed}: {_first_difference(reference, lines)}"
    )


@pytest.mark.parametrize("name", sorted(CARD_INPUTS))
def test_dataset_card_is_byte_identical_to_the_reference(name):
    summary, options = CARD_INPUTS[name]
    expected = _card_path(name).read_text(encoding="utf-8")
    assert dataset_card(summary, **options) == expected


def record(tmp_dir: Path) -> None:
    """Re-record every reference from the current code."""
    DATA.mkdir(exist_ok=True)
    runs = []
    for index, (catalog_name, rows, seed) in enumerate(TEXT_RUNS):
        catalog = _catalog(catalog_name, tmp_dir / str(index))
        runs.append(_record(catalog_name, rows, seed, _lines(catalog, rows, seed)))
    TEXT_REFERENCE.write_text(
        json.dumps({"block_rows": BLOCK_ROWS, "runs": runs}, indent=1, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    for name, (summary, options) in CARD_INPUTS.items():
        _card_path(name).write_text(dataset_card(summary, **options), encoding="utf-8")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        record(Path(tmp))
    sys.exit(0)
