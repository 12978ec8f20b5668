"""The taxonomy tables of docs/DATAGEN.md, generated from the code.

    python -m services.datagen.text.taxonomy > /tmp/taxonomy.md

Examples are the first row of each (category, edit type) in the paper-sized
run (3,000 rows, seed 0, every edit type including the opt-in ones), so the
doc shows exactly what the CLI writes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from .catalog import Catalog, load_catalog
from .edits import EDIT_TYPES
from .synthesizer import TextRow, synthesize

__all__ = [
    "category_table",
    "edit_type_table",
    "examples",
    "matrix",
    "sample_table",
    "varied_rows",
]

DOC_ROWS = 3000
DOC_SEED = 0
# The sample rows of the doc: this many, from different categories and edit types.
DOC_SAMPLES = 20


def examples(
    catalog: Catalog, rows: int = DOC_ROWS, seed: int = DOC_SEED
) -> dict[tuple[str, str], TextRow]:
    """First row per (category, edit type), every edit type included."""
    every = [edit.name for edit in EDIT_TYPES]
    found: dict[tuple[str, str], TextRow] = {}
    for row in synthesize(rows, seed, catalog, edit_types=every):
        found.setdefault((row.category, row.edit_type), row)
    return found


def varied_rows(catalog: Catalog, count: int = DOC_SAMPLES, seed: int = DOC_SEED) -> list[TextRow]:
    """``count`` rows of a default run, each of an edit type no earlier one has, and at
    most two per category: the spread of a run at a glance."""
    per_category = -(-count // len(catalog.categories))
    chosen: list[TextRow] = []
    edit_types: set[str] = set()
    categories: dict[str, int] = {}
    for row in synthesize(DOC_ROWS, seed, catalog):
        if row.edit_type in edit_types or categories.get(row.category, 0) >= per_category:
            continue
        chosen.append(row)
        edit_types.add(row.edit_type)
        categories[row.category] = categories.get(row.category, 0) + 1
        if len(chosen) == count:
            break
    return chosen


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(header: Iterable[str], body: Iterable[Iterable[str]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(str(c)) for c in row) + " |" for row in body]
    return "\n".join(lines)


def category_table(catalog: Catalog) -> str:
    body = []
    for category in catalog.categories:
        nouns = ", ".join(p.noun for p in category.products[:6])
        body.append(
            (
                f"`{category.name}`",
                category.label,
                len(category.products),
                len(category.surfaces) + len(category.places),
                f"{nouns}, ...",
            )
        )
    return _table(("category", "label", "products", "settings", "e.g."), body)


def edit_type_table(catalog: Catalog, found: dict[tuple[str, str], TextRow]) -> str:
    body = []
    for index, edit in enumerate(EDIT_TYPES):
        # Rotate through categories so the examples show the whole catalog.
        names = catalog.category_names
        rotated = names[index % len(names) :] + names[: index % len(names)]
        row = next(found[(name, edit.name)] for name in rotated if (name, edit.name) in found)
        body.append(
            (
                f"`{edit.name}`" + ("" if edit.default_enabled else " (opt-in)"),
                f"`{edit.slot}`",
                edit.summary,
                edit.why,
                f"*{row.instruction}*",
                row.input_caption,
                row.output_caption,
            )
        )
    return _table(
        (
            "edit type",
            "slot",
            "what it does",
            "why a picture can show it",
            "instruction",
            "input caption",
            "output caption",
        ),
        body,
    )


def matrix(catalog: Catalog, found: dict[tuple[str, str], TextRow]) -> str:
    """One collapsible table per category: every edit type with one example."""
    sections = []
    for category in catalog.categories:
        body = [
            (f"`{edit.name}`", row.input_caption, f"*{row.instruction}*", row.output_caption)
            for edit in EDIT_TYPES
            if (row := found.get((category.name, edit.name))) is not None
        ]
        table = _table(("edit type", "input caption", "instruction", "output caption"), body)
        sections.append(
            f"<details><summary><b>{category.label}</b> (<code>{category.name}</code>)"
            f"</summary>\n\n{table}\n\n</details>"
        )
    return "\n\n".join(sections)


def sample_table(rows: Iterable[TextRow]) -> str:
    return _table(
        ("#", "category", "edit type", "input caption", "instruction", "output caption"),
        (
            (
                r.index,
                r.category,
                r.edit_type,
                r.input_caption,
                f"*{r.instruction}*",
                r.output_caption,
            )
            for r in rows
        ),
    )


def main() -> int:
    catalog = load_catalog()
    found = examples(catalog)
    out = sys.stdout
    out.write("### Categories\n\n" + category_table(catalog) + "\n\n")
    out.write("### Edit types\n\n" + edit_type_table(catalog, found) + "\n\n")
    out.write("### Categories x edit types\n\n" + matrix(catalog, found) + "\n\n")
    out.write("### Sample rows\n\n" + sample_table(varied_rows(catalog)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
