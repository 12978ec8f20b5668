"""The rules a caption's slots follow (services/datagen/text/coherence.py) and the
synthesizer's options that use them (edit types, attribute limit)."""

from __future__ import annotations

import itertools

import pytest

from services.datagen.__main__ import main
from services.datagen.text import DEFAULT_EDIT_TYPES, EDIT_TYPE_NAMES, synthesize
from services.datagen.text.captions import ADJECTIVE_SLOTS, empty_slots
from services.datagen.text.catalog import Setting
from services.datagen.text.catalog_schema import compatible, scene_setting
from services.datagen.text.coherence import coherent, words_apart

S = Setting


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ((), S.EITHER),
        ((S.EITHER, S.EITHER), S.EITHER),
        ((S.INDOOR, S.EITHER), S.INDOOR),
        ((S.STUDIO, S.INDOOR), S.STUDIO),
        ((S.OUTDOOR, S.EITHER), S.OUTDOOR),
        ((S.OUTDOOR, S.INDOOR), None),
        ((S.STUDIO, S.OUTDOOR), None),
    ],
)
def test_a_scene_s_setting(parts, expected):
    assert scene_setting(parts) is expected


def test_compatibility_is_symmetric_and_either_fits_all():
    for a, b in itertools.product(Setting, repeat=2):
        assert compatible(a, b) == compatible(b, a)
        if S.EITHER in (a, b):
            assert compatible(a, b)
    assert not compatible(S.OUTDOOR, S.STUDIO) and compatible(S.INDOOR, S.STUDIO)


def _slots(**values: str) -> dict[str, str]:
    return {**empty_slots(), "product": "hoodie", **values}


@pytest.fixture
def apparel(catalog):
    return catalog.category("apparel")


def _surface(category, setting: Setting) -> str:
    return next(s for s in category.surfaces if category.settings[s] is setting)


def test_coherent_scenes(catalog, apparel):
    indoor, outdoor = _surface(apparel, S.INDOOR), _surface(apparel, S.OUTDOOR)
    either = _surface(apparel, S.EITHER)
    sky = next(b for b in apparel.backgrounds if apparel.settings[b] is S.OUTDOOR)
    assert coherent(catalog, apparel, _slots(surface=outdoor, weather="in the rain"))
    assert not coherent(catalog, apparel, _slots(surface=indoor, weather="in the rain"))
    # Not merely "could be outdoors": snow on a wooden table is no product photo.
    assert not coherent(catalog, apparel, _slots(surface=either, season="in winter"))
    assert not coherent(catalog, apparel, _slots(surface=indoor, background=sky))
    assert not coherent(catalog, apparel, _slots(surface=indoor, lighting="at sunset"))
    assert coherent(catalog, apparel, _slots(surface=outdoor, lighting="at sunset"))
    assert not coherent(
        catalog, apparel, _slots(surface=outdoor, lighting="under warm indoor light")
    )
    assert coherent(catalog, apparel, _slots(surface=either, lighting="under warm indoor light"))


def test_coherent_products(catalog, apparel):
    assert coherent(catalog, apparel, _slots(color="black", material="cotton"))
    assert not coherent(catalog, apparel, _slots(color="black", material="cotton", style="boxy"))
    assert coherent(catalog, apparel, _slots(color="black", style="boxy"), max_attributes=3)
    assert not coherent(catalog, apparel, _slots(color="black", material="18k gold"))
    assert not coherent(catalog, apparel, _slots(condition="brand-new", style="vintage"))


def test_no_two_slots_say_the_same_word():
    assert words_apart(_slots(color="black", surface="on a wooden table"))
    assert not words_apart(_slots(product="basketball", place="on a basketball court"))
    assert not words_apart(_slots(place="in a bright playroom", lighting="in bright even light"))
    assert not words_apart(_slots(condition="rusty", color="rust orange"))  # by stem
    assert not words_apart(_slots(graphic="a paw print printed on it"))


# --- the synthesizer's options --------------------------------------------------------


def test_exact_lettering_only_when_asked_for(catalog):
    assert "text_print" in EDIT_TYPE_NAMES and "text_print" not in DEFAULT_EDIT_TYPES
    assert "camera_view" not in EDIT_TYPE_NAMES
    rows = list(synthesize(400, 0, catalog, edit_types=["text_print", "print_removal"]))
    assert {row.edit_type for row in rows} == {"text_print", "print_removal"}
    assert any("the word '" in r.output_caption or "the text '" in r.output_caption for r in rows)


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_the_attribute_limit_holds_for_both_captions(catalog, limit):
    counts = []
    for row in synthesize(3000, 0, catalog, max_attributes=limit):
        for slots in (row.input_slots, row.output_slots):
            counts.append(sum(bool(slots[slot]) for slot in ADJECTIVE_SLOTS))
    assert max(counts) == limit


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"edit_types": ["camera_view"]}, "unknown edit types"),
        ({"edit_types": []}, "at least one"),
        ({"max_attributes": 0}, "max_attributes"),
        ({"max_attributes": 7}, "max_attributes"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        synthesize(10, 0, **options)


def test_a_change_to_a_self_colored_metal_drops_the_color(catalog):
    rows = [
        row
        for row in synthesize(20_000, 0, catalog, edit_types=["material_change"])
        if row.output_slots["material"] in catalog.self_colored_materials
    ]
    assert rows
    for row in rows:
        assert not row.output_slots["color"], row
        if row.input_slots["color"]:
            assert "color" in row.changed_slots


def test_a_cut_out_drops_the_time_of_day(catalog):
    times = {cue.phrase for cue in catalog.times_of_day}
    rows = list(synthesize(20_000, 0, catalog, edit_types=["background_removal"]))
    assert any(row.input_slots["lighting"] in times for row in rows)
    assert not any(row.output_slots["lighting"] in times for row in rows)


def test_the_text_command_takes_the_options(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    argv = ["text", "--rows", "50", "--out", str(out), "--edit-types", "text_print"]
    assert main([*argv, "--max-attributes", "1"]) == 0
    assert out.read_text().count('"edit_type": "text_print"') == 50
    with pytest.raises(SystemExit) as exit_:
        main(["text", "--rows", "5", "--out", "-", "--edit-types", "camera_view"])
    assert exit_.value.code == 2
    assert "unknown edit types ['camera_view']" in capsys.readouterr().err
