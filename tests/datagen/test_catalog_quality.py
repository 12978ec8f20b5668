"""The bundled catalog at scale: 100,000 rows per seed, several seeds, every row coherent.

The checks here are written from the catalog's data (each phrase's setting, the
self-colored materials, the exclusive pairs), not by calling the synthesizer's own
``coherence`` module, so a bug there cannot hide itself; and the data audit, which
knows nothing of slots or settings, must find nothing.
"""

from __future__ import annotations

import pytest

from services.datagen.audit import audit_rows
from services.datagen.text import DEFAULT_EDIT_TYPES, synthesize
from services.datagen.text.captions import ADJECTIVE_SLOTS
from services.datagen.text.catalog import Setting

ROWS = 100_000
SEEDS = (0, 1, 2)
SKY_EDITS = {"weather_change", "weather_clearing", "season_change", "time_of_day_change"}


@pytest.fixture(scope="module", params=SEEDS, ids=lambda seed: f"seed{seed}")
def rows_100k(request, catalog) -> list[dict]:
    return [row.to_dict() for row in synthesize(ROWS, request.param, catalog)]


def _settings(catalog, category, slots) -> set[Setting]:
    return {category.settings[v] for s in ("surface", "place", "background") if (v := slots[s])}


def test_the_bundled_catalog_audits_clean(rows_100k):
    report = audit_rows(rows_100k, examples=5)
    assert report.rows == ROWS
    assert report.clean, report.format_table()


def test_rows_are_unique(rows_100k):
    assert len({(row["input_caption"], row["instruction"]) for row in rows_100k}) == ROWS


def test_every_scene_agrees_with_itself(rows_100k, catalog):
    times_of_day = {cue.phrase for cue in catalog.times_of_day}
    lighting_setting = {cue.phrase: cue.setting for cue in catalog.lightings}
    lighting_setting |= {cue.phrase: cue.setting for cue in catalog.ambient_lightings}
    categories = {category.name: category for category in catalog.categories}
    for row in rows_100k:
        category = categories[row["category"]]
        for slots in (row["input_slots"], row["output_slots"]):
            settings = _settings(catalog, category, slots)
            roofed = settings & {Setting.INDOOR, Setting.STUDIO}
            # A marble countertop never stands against a mountain range.
            assert not (roofed and Setting.OUTDOOR in settings), row
            # Sky phrases only under an open sky: some part outdoors, none roofed.
            sky = slots["weather"] or slots["season"] or slots["lighting"] in times_of_day
            if sky:
                assert Setting.OUTDOOR in settings and not roofed, row
            # Indoor and studio light never outdoors.
            needs = lighting_setting.get(slots["lighting"])
            if needs in (Setting.INDOOR, Setting.STUDIO):
                assert Setting.OUTDOOR not in settings, row
            assert not (slots["weather"] and slots["season"]), row
            assert not (slots["surface"] and slots["place"]), row


def test_sky_edits_happen_outdoors(rows_100k, catalog):
    categories = {category.name: category for category in catalog.categories}
    seen = set()
    for row in rows_100k:
        if row["edit_type"] in SKY_EDITS:
            seen.add(row["edit_type"])
            settings = _settings(catalog, categories[row["category"]], row["input_slots"])
            assert Setting.OUTDOOR in settings, row
    assert seen == SKY_EDITS


def test_products_are_what_they_can_be(rows_100k, catalog):
    for row in rows_100k:
        for slots in (row["input_slots"], row["output_slots"]):
            values = [slots[slot] for slot in ADJECTIVE_SLOTS if slots[slot]]
            # Stable Diffusion binds two attribute words, not five.
            assert len(values) <= 2, row
            # No color word on a metal that is its own color.
            assert not (slots["color"] and slots["material"] in catalog.self_colored_materials)
            for pair in catalog.exclusive_values:
                assert not pair <= set(values), row


def test_only_depictable_edits_by_default(rows_100k):
    assert {row["edit_type"] for row in rows_100k} == set(DEFAULT_EDIT_TYPES)
    for row in rows_100k:
        # No exact lettering (Stable Diffusion 1.5 cannot spell), no camera moves.
        for caption in (row["input_caption"], row["output_caption"]):
            assert "the word '" not in caption and "the text '" not in caption, row
        assert row["edit_type"] not in ("text_print", "camera_view"), row
        assert row["input_slots"]["view"] == row["output_slots"]["view"], row
