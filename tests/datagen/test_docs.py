"""docs/DATAGEN.md pastes tables generated from the code; keep them current.

Regenerate with ``python -m services.datagen.text.taxonomy`` and paste.
"""

from pathlib import Path

from services.datagen.text.taxonomy import (
    category_table,
    edit_type_table,
    examples,
    matrix,
    sample_table,
    varied_rows,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "DATAGEN.md"


def test_datagen_doc_tables_match_the_code(catalog):
    text = DOC.read_text(encoding="utf-8")
    found = examples(catalog)
    assert category_table(catalog) in text
    assert edit_type_table(catalog, found) in text
    assert matrix(catalog, found) in text
    samples = varied_rows(catalog)
    assert sample_table(samples) in text
    assert len(samples) == 20
    assert len({row.edit_type for row in samples}) == 20
    assert len({row.category for row in samples}) == len(catalog.categories)
    assert "## Image pairs" in text
