"""Text synthesizer: (input caption, edit instruction, output caption) rows for products.

The hard-coded, model-free text stage of the dataset generator (paper section
IV-A). A hand-written catalog (``services/datagen/catalog/*.yaml``) says
which words fit which product and how each edit is worded (``edits.yaml``);
captions are rendered from slots; edit types change slots and word an
instruction; the synthesizer schedules, samples and de-duplicates rows.

    from services.datagen.text import synthesize
    for row in synthesize(rows=3000, seed=0):
        row.input_caption, row.instruction, row.output_caption
"""

from .articles import indefinite_article, with_article
from .captions import SLOT_NAMES, caption_segments, render_caption
from .catalog import Catalog, CatalogError, load_catalog
from .edits import DEFAULT_EDIT_TYPES, EDIT_TYPE_NAMES, EDIT_TYPES, EditType, resolve_edit_types
from .export import row_to_json, write_jsonl
from .synthesizer import MAX_ROWS, SpaceExhaustedError, TextRow, synthesize

__all__ = [
    "DEFAULT_EDIT_TYPES",
    "EDIT_TYPES",
    "EDIT_TYPE_NAMES",
    "MAX_ROWS",
    "SLOT_NAMES",
    "Catalog",
    "CatalogError",
    "EditType",
    "SpaceExhaustedError",
    "TextRow",
    "caption_segments",
    "indefinite_article",
    "load_catalog",
    "render_caption",
    "resolve_edit_types",
    "row_to_json",
    "synthesize",
    "with_article",
    "write_jsonl",
]
