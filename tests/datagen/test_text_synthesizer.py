"""Properties of every synthesized row, plus size, balance and reproducibility."""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter

import pytest

from services.datagen.text import (
    DEFAULT_EDIT_TYPES,
    MAX_ROWS,
    SLOT_NAMES,
    SpaceExhaustedError,
    TextRow,
    caption_segments,
    indefinite_article,
    render_caption,
    synthesize,
    write_jsonl,
)
from services.datagen.text.captions import ARTICLE
from services.datagen.text.edits import BRAND_NEW

PAPER_CATEGORIES = 10
PAPER_EDIT_TYPES = 25


# --- output caption is exact -------------------------------------------------


def test_captions_are_rendered_from_their_slots(rows_3000):
    for row in rows_3000:
        assert render_caption(row.input_slots) == row.input_caption, row
        assert render_caption(row.output_slots) == row.output_caption, row


def test_caption_segments_are_the_caption(rows_3000):
    for row in rows_3000:
        for slots, caption in (
            (row.input_slots, row.input_caption),
            (row.output_slots, row.output_caption),
        ):
            assert "".join(text for _, text in caption_segments(slots)) == caption


def test_slots_differ_exactly_in_changed_slots(rows_3000):
    for row in rows_3000:
        assert set(row.input_slots) == set(row.output_slots) == set(SLOT_NAMES)
        differing = tuple(s for s in SLOT_NAMES if row.input_slots[s] != row.output_slots[s])
        assert differing == row.changed_slots, row
        assert row.changed_slots, row
        assert row.input_caption != row.output_caption, row


def test_caption_outside_changed_phrases_is_unchanged(rows_3000):
    """Cut the changed slots' phrases (and the a/an that may follow them) out
    of both captions: what is left must be the same text."""

    def remainder(slots, changed):
        return "".join(
            text
            for slot, text in caption_segments(slots)
            if slot not in changed and slot != ARTICLE
        )

    for row in rows_3000:
        changed = set(row.changed_slots)
        assert remainder(row.input_slots, changed) == remainder(row.output_slots, changed), row


def test_unchanged_values_appear_verbatim_in_both_captions(rows_3000):
    # A black-box cross-check of the segment test: every kept slot value is
    # still literally in the output caption.
    for row in rows_3000:
        for slot in SLOT_NAMES:
            value = row.input_slots[slot]
            if value and slot not in row.changed_slots:
                assert value in row.input_caption and value in row.output_caption, (slot, row)
        for slot in row.changed_slots:
            if value := row.output_slots[slot]:
                assert value in row.output_caption, (slot, row)


def test_every_caption_has_the_right_article(rows_3000):
    for row in rows_3000:
        for slots in (row.input_slots, row.output_slots):
            segments = caption_segments(slots)
            position = next(i for i, (slot, _) in enumerate(segments) if slot == ARTICLE)
            article = segments[position][1].strip()
            assert article == indefinite_article(segments[position + 1][1]), segments


def test_captions_are_clean_text(rows_3000):
    for row in rows_3000:
        for text in (row.input_caption, row.instruction, row.output_caption):
            assert text == text.strip() and "  " not in text and " ," not in text, text
            assert "{" not in text and "}" not in text, text
            assert not re.search(r"\b(a|an) (a|an|the)\b", text), text


# --- edits follow the catalog -------------------------------------------------


def test_new_attribute_values_come_from_the_catalog(rows_3000, catalog):
    derived = {BRAND_NEW}  # restoration's target, not a catalog value
    for row in rows_3000:
        category = catalog.category(row.category)
        product = next(p for p in category.products if p.noun == row.output_slots["product"])
        for slot, allowed in product.values.items():
            value = row.output_slots[slot]
            if not value or value in derived:
                continue
            if row.edit_type == "color_shade" and slot == "color":
                shade, _, base = value.partition(" ")
                assert shade in ("dark", "light") and base in allowed, row
                continue
            assert value in allowed, (slot, value, row)
        for slot, allowed in (
            ("surface", category.surfaces),
            ("place", category.places),
            ("companion", category.companions),
        ):
            assert row.output_slots[slot] in ("", *allowed), (slot, row)
        assert row.output_slots["background"] in (
            "",
            catalog.plain_background,
            *category.backgrounds,
        ), row


def test_no_weather_or_season_indoors(rows_3000, catalog):
    for row in rows_3000:
        indoor = catalog.category(row.category).indoor_places
        for slots in (row.input_slots, row.output_slots):
            if slots["place"] in indoor:
                assert not slots["weather"] and not slots["season"], row
            assert not (slots["weather"] and slots["season"]), row
            assert not (slots["surface"] and slots["place"]), row


def test_instructions_are_worded_several_ways(rows_3000):
    wordings: dict[str, set[str]] = {}
    for row in rows_3000:
        # Mask the values so only the template's own words are compared.
        masked = row.instruction
        for value in sorted(
            {*row.input_slots.values(), *row.output_slots.values()}, key=len, reverse=True
        ):
            if value:
                masked = masked.replace(value, "#")
        wordings.setdefault(row.edit_type, set()).add(masked.split(" ")[0])
    few = {edit: words for edit, words in wordings.items() if len(words) < 2}
    assert not few, f"edit types with a single leading verb: {few}"


def test_issue_examples_are_produced():
    rows = list(synthesize(20_000, seed=1))
    instructions = {row.instruction for row in rows}
    patterns = [
        r"^change (its|their) color to .+$",
        r"^make (it|them) grey$|^make (it|them) \w+$",
        r"^turn the .+ (grey|gray|\w+)$",
        r"^print an? .+ logo on (it|them)$",
        r"Spider-Man logo",
        r"^(put|place|show|set) .*on sand$",
        r"^(put|place|show|set) .*on a wooden table$",
        r"^(put|place|show) .*in a stadium$",
        r"^make it snow$",
        r"^make it rain$",
        r"^add fog$",
        r"^make it golden hour$",
        r"^change the lighting to (studio|neon) light$",
        r"watercolor painting",
        r"pencil sketch",
        r"oil painting",
        r"vintage photo",
        r"minimalist 3D render",
        r"^remove the background$",
        r"^put (it|them) on a plain white background$",
        r"^add an? .+ next to (it|them)$",
        r"^make it (spring|summer|autumn|winter)$",
    ]
    for pattern in patterns:
        assert any(re.search(pattern, text) for text in instructions), pattern


# --- uniqueness, reproducibility, size ----------------------------------------


def test_no_duplicate_caption_instruction_pairs(rows_3000):
    keys = [(row.input_caption, row.instruction) for row in rows_3000]
    assert len(set(keys)) == len(keys) == 3000


def test_rows_are_numbered_and_carry_the_seed(rows_3000):
    assert [row.index for row in rows_3000] == list(range(3000))
    assert {row.seed for row in rows_3000} == {0}


def test_same_seed_gives_byte_identical_jsonl(tmp_path, catalog):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert write_jsonl(synthesize(1500, seed=7, catalog=catalog), first) == 1500
    assert write_jsonl(synthesize(1500, seed=7, catalog=catalog), second) == 1500
    assert first.read_bytes() == second.read_bytes()


def test_different_seeds_give_different_rows(catalog):
    a = [r.to_dict() for r in synthesize(300, seed=1, catalog=catalog)]
    b = [r.to_dict() for r in synthesize(300, seed=2, catalog=catalog)]
    pairs_a = {(r["input_caption"], r["instruction"]) for r in a}
    pairs_b = {(r["input_caption"], r["instruction"]) for r in b}
    assert len(pairs_a & pairs_b) < 10


def test_a_prefix_of_a_run_is_a_shorter_run(catalog):
    long = list(itertools.islice(synthesize(1000, seed=3, catalog=catalog), 200))
    short = list(synthesize(200, seed=3, catalog=catalog))
    assert long == short


@pytest.mark.timeout(60)
def test_100k_unique_rows_in_seconds(catalog):
    started = time.perf_counter()
    keys = {(row.input_caption, row.instruction) for row in synthesize(100_000, 0, catalog)}
    elapsed = time.perf_counter() - started
    assert len(keys) == 100_000
    # ~4 s on a 2-core dev box; the margin only catches gross regressions.
    assert elapsed < 20, f"100k rows took {elapsed:.1f}s"


# --- balance ------------------------------------------------------------------


def test_paper_sized_set_covers_every_category_and_edit_type(rows_3000, catalog):
    assert len(catalog.categories) >= PAPER_CATEGORIES
    assert len(DEFAULT_EDIT_TYPES) >= PAPER_EDIT_TYPES
    assert {row.category for row in rows_3000} == set(catalog.category_names)
    assert {row.edit_type for row in rows_3000} == set(DEFAULT_EDIT_TYPES)


def test_rows_are_spread_evenly(rows_3000):
    per_category = Counter(row.category for row in rows_3000)
    assert max(per_category.values()) - min(per_category.values()) <= 1
    per_cell = Counter((row.category, row.edit_type) for row in rows_3000)
    # Each category cycles through its edit types before repeating one.
    assert max(per_cell.values()) - min(per_cell.values()) <= 1
    per_edit = Counter(row.edit_type for row in rows_3000)
    assert min(per_edit.values()) >= 3000 / len(DEFAULT_EDIT_TYPES) / 2


# --- API edges --------------------------------------------------------------


def test_to_dict_has_the_documented_columns(rows_3000):
    row = rows_3000[0].to_dict()
    assert list(row) == [
        "index",
        "seed",
        "category",
        "edit_type",
        "input_caption",
        "instruction",
        "output_caption",
        "changed_slots",
        "input_slots",
        "output_slots",
    ]
    assert isinstance(row["changed_slots"], list) and isinstance(row["input_slots"], dict)


def test_rows_are_immutable(rows_3000):
    row: TextRow = rows_3000[0]
    with pytest.raises(AttributeError):
        row.instruction = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        row.input_slots["color"] = "x"  # type: ignore[index]


def test_zero_rows_is_empty():
    assert list(synthesize(0, seed=0)) == []


@pytest.mark.parametrize("rows", [-1, 1.5, True, "10", MAX_ROWS + 1])
def test_bad_row_counts_are_refused_up_front(rows):
    with pytest.raises(ValueError):
        synthesize(rows, seed=0)


def test_bad_seed_is_refused():
    with pytest.raises(ValueError):
        synthesize(10, seed="0")  # type: ignore[arg-type]


def test_more_rows_than_the_space_holds_is_a_clear_error(tiny_catalog):
    started = time.perf_counter()
    with pytest.raises(SpaceExhaustedError, match=r"only \d+ unique .* 100000 were requested"):
        list(synthesize(100_000, seed=0, catalog=tiny_catalog))
    assert time.perf_counter() - started < 5


def test_an_exhausted_catalog_yields_unique_rows_until_it_stops(tiny_catalog):
    rows = []
    with pytest.raises(SpaceExhaustedError):
        rows.extend(synthesize(100_000, seed=0, catalog=tiny_catalog))
    keys = {(r.input_caption, r.instruction) for r in rows}
    assert 100 < len(rows) == len(keys) < 5000
