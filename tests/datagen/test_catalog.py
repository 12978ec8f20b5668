"""The packaged catalog's content, and the loader's validation."""

from __future__ import annotations

import re
from importlib import resources

import pytest
import yaml

from services.datagen.text import (
    EDIT_TYPES,
    CatalogError,
    indefinite_article,
    load_catalog,
    synthesize,
)
from services.datagen.text.catalog import ATTRIBUTE_SLOTS, _load_directory
from services.datagen.text.edits import EditContext

from .conftest import tiny_category, tiny_common, write_catalog

REQUIRED_CATEGORIES = {
    "apparel",
    "footwear",
    "bags_accessories",
    "jewelry_watches",
    "electronics",
    "furniture",
    "home_kitchen",
    "beauty_personal_care",
    "sports_outdoors",
    "toys",
}


def test_catalog_has_the_ten_categories(catalog):
    assert set(catalog.category_names) >= REQUIRED_CATEGORIES


def test_every_category_is_rich(catalog):
    for category in catalog.categories:
        assert len(category.products) >= 25, category.name
        assert len(category.surfaces) >= 10, category.name
        assert len(category.places) >= 10, category.name
        assert len(category.companions) >= 10, category.name
        products_with = {
            slot: sum(bool(p.values[slot]) for p in category.products) for slot in ATTRIBUTE_SLOTS
        }
        assert products_with["color"] == len(category.products), category.name
        assert products_with["material"] >= len(category.products) * 0.8, category.name


def test_every_category_supports_every_edit_type(catalog):
    for category in catalog.categories:
        unsupported = [
            edit.name
            for edit in EDIT_TYPES
            if not any(edit.supports(catalog, category, p) for p in category.products)
        ]
        assert not unsupported, category.name


def test_materials_are_per_product(catalog):
    # "make it leather" must not reach a smartphone.
    electronics = catalog.category("electronics")
    smartphone = next(p for p in electronics.products if p.noun == "smartphone")
    assert "leather" not in smartphone.values["material"]
    assert "aluminum" in smartphone.values["material"]


_ARTICLE_USE = re.compile(r"(?:^|\s)(a|an) ([A-Za-z0-9][\w'-]*)")


def _catalog_phrases(catalog):
    yield from catalog.patterns.values()
    yield from catalog.mediums
    yield catalog.plain_background
    for cues in (
        catalog.weather,
        catalog.views,
        catalog.filters,
        catalog.decors,
        catalog.lightings,
        catalog.times_of_day,
        catalog.seasons,
    ):
        for cue in cues:
            yield cue.phrase
            yield cue.name
            yield from cue.instructions
    for wording in catalog.edit_wordings.values():
        yield from wording.instructions
        for by_value in wording.when.values():
            for templates in by_value.values():
                yield from templates
    for category in catalog.categories:
        yield from category.surfaces
        yield from category.places
        yield from category.backgrounds
        yield from category.companions


def test_hand_written_articles_agree_with_the_article_rule(catalog):
    wrong = [
        phrase
        for phrase in _catalog_phrases(catalog)
        for article, word in _ARTICLE_USE.findall(phrase)
        if article != indefinite_article(word)
    ]
    assert not wrong


def test_companions_are_written_without_an_article(catalog):
    for category in catalog.categories:
        for companion in category.companions:
            assert not companion.startswith(("a ", "an ", "the ")), companion


def test_the_packaged_catalog_is_loaded_once(catalog):
    assert load_catalog() is catalog


def test_a_minimal_catalog_loads(tmp_path):
    catalog = load_catalog(write_catalog(tmp_path))
    assert catalog.category_names == ("mugs",)
    teacups = catalog.categories[0].products[1]
    assert teacups.unit == "set" and teacups.values["color"] == ("red", "blue")


def _broken(tmp_path, *, common=None, category=None):
    write_catalog(tmp_path, common or tiny_common(), [category or tiny_category()])
    return tmp_path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["defaults"].update(pattern=["zigzag"]), "unknown pattern"),
        (lambda c: c.update(graphic_methods=["tattoo"]), "unknown method"),
        (lambda c: c.update(name="cups", file_stem="mugs"), "must match the file name"),
        (lambda c: c.update(colour=["red"]), "unknown key"),
        (lambda c: c["products"].append({"noun": "jug", "unit": "dozen"}), "must be one of"),
        (lambda c: c["products"].append({"noun": "mug"}), "duplicate nouns"),
        (lambda c: c["products"].append({"noun": "jug", "colour": ["red"]}), "unknown key"),
        (lambda c: c.update(surfaces={"indoor": ["table"]}), "must start with 'on '"),
        (
            lambda c: c.update(surfaces={"indoors": ["on a table"]}),
            r"surfaces\.indoors: unknown key",
        ),
        (lambda c: c.update(surfaces={}), r"surfaces: expected a non-empty list"),
        (lambda c: c.update(surfaces=["on a table"]), r"surfaces: expected a mapping"),
        (lambda c: c["places"].update(either=["in a tent"]), r"places\.either: unknown key"),
        (lambda c: c["places"].update(studio=["a photo studio"]), "must start with 'in'"),
        (
            lambda c: c.update(surfaces={"indoor": ["on a table"], "outdoor": ["on a table"]}),
            "duplicate values",
        ),
        (lambda c: c.update(companions=["spoon", "spoon"]), "duplicate values"),
        (lambda c: c.update(companions=["spoon "]), "stray spaces"),
        (lambda c: c.update(companions=[]), "non-empty list"),
        (lambda c: c["defaults"].update(color=[]), "needs colors"),
        (lambda c: c.pop("surfaces"), "missing"),
        (
            lambda c: c.update(backgrounds={"studio": ["a plain white background"]}),
            "plain background",
        ),
        (lambda c: c["products"][0].update(material=["glass", 3]), r"products\[0\]\.material"),
    ],
)
def test_broken_category_files_are_refused(tmp_path, change, message):
    category = tiny_category()
    change(category)
    with pytest.raises(CatalogError, match=message):
        load_catalog(_broken(tmp_path, category=category))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["filters"][0].update(instructions=["show {thing}"]), "unknown placeholders"),
        (lambda c: c["filters"][0].update(instructions=["show {it"]), "bad template"),
        (lambda c: c["views"][0].update(instructions=["show {it} from above"]), "no edit changes"),
        (lambda c: c["lightings"][0].update(setting="daylight"), r"lightings\[0\]\.setting"),
        (lambda c: c["ambient_lightings"].append("in daylight"), "expected a mapping"),
        (lambda c: c.update(exclusive_values=[["new"]]), "exclusive_values"),
        (lambda c: c.pop("logos"), "missing"),
        (lambda c: c.update(mediums="sketch"), "non-empty list"),
        (lambda c: c["seasons"][0].pop("name"), "missing"),
        (lambda c: c["input_odds"].update(view=1.5), "from 0 to 1"),
        (lambda c: c["input_odds"].pop("view"), "missing"),
        (lambda c: c["input_odds"].update(surface=0.5), "must add up to 1"),
        (lambda c: c["input_odds"].update(weather=0.7, season=0.7), "at most 1"),
        (lambda c: c["input_odds"].update(sparkle=0.1), "unknown key"),
    ],
)
def test_broken_common_files_are_refused(tmp_path, change, message):
    common = tiny_common()
    change(common)
    with pytest.raises(CatalogError, match=message):
        load_catalog(_broken(tmp_path, common=common))


def test_invalid_yaml_names_the_file(tmp_path):
    write_catalog(tmp_path)
    (tmp_path / "mugs.yaml").write_text("name: [unclosed\n")
    with pytest.raises(CatalogError, match=r"mugs\.yaml: not valid YAML"):
        load_catalog(tmp_path)


def test_a_directory_without_common_is_refused(tmp_path):
    (tmp_path / "mugs.yaml").write_text(yaml.safe_dump(tiny_category()))
    with pytest.raises(CatalogError, match=r"no common\.yaml"):
        load_catalog(tmp_path)


# --- edits.yaml: the edit types' wordings ----------------------------------------


def _packaged_edits() -> dict:
    path = resources.files("services.datagen") / "catalog" / "edits.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _with_edits(tmp_path, edits: dict):
    write_catalog(tmp_path)
    (tmp_path / "edits.yaml").write_text(yaml.safe_dump(edits))
    return tmp_path


def test_every_worded_edit_type_has_a_wording_and_cue_worded_ones_none(catalog):
    for edit in EDIT_TYPES:
        assert (edit.name in catalog.edit_wordings) != edit.by_cues, edit.name


def test_lettering_wordings_are_keyed_by_known_methods(catalog):
    # `when` values are free text to the loader; a misspelled method would never match.
    for wording in catalog.edit_wordings.values():
        for value in wording.when.get("method", {}):
            assert value in catalog.graphic_methods, value


def test_edit_types_fill_in_exactly_the_placeholders_they_declare(catalog, monkeypatch):
    passed: dict[str, set[str]] = {}
    owner = {id(wording): name for name, wording in catalog.edit_wordings.items()}
    edit = EditContext.edit

    def recording_edit(self, changes, wording, *, shade_of_old=False, **words):
        passed.setdefault(owner[id(wording)], set()).update(words)
        return edit(self, changes, wording, shade_of_old=shade_of_old, **words)

    monkeypatch.setattr(EditContext, "edit", recording_edit)
    every = [edit.name for edit in EDIT_TYPES]  # the opt-in ones (text_print) too
    for _ in synthesize(3000, seed=0, catalog=catalog, edit_types=every):
        pass
    declared = {e.name: set(e.placeholders) for e in EDIT_TYPES if not e.by_cues}
    assert passed == declared


def test_a_catalog_without_edits_yaml_uses_the_packaged_wordings(tiny_catalog, catalog):
    assert tiny_catalog.edit_wordings is catalog.edit_wordings


def test_a_catalog_with_its_own_edits_yaml_uses_it(tmp_path):
    edits = _packaged_edits()
    edits["color_change"] = {"instructions": ["paint {it} {new}, please"]}
    tiny = load_catalog(_with_edits(tmp_path, edits))
    assert tiny.category_names == ("mugs",)  # edits.yaml is no category
    recolored = [row for row in synthesize(200, 0, tiny) if row.edit_type == "color_change"]
    assert recolored
    for row in recolored:
        it = "them" if row.input_slots["unit"] else "it"
        assert row.instruction == f"paint {it} {row.output_slots['color']}, please"


def test_the_packaged_catalog_needs_its_edits_yaml(tmp_path):
    with pytest.raises(CatalogError, match=r"no edits\.yaml"):
        _load_directory(write_catalog(tmp_path), packaged=True)


def _variant(edits: dict) -> dict:
    return edits["color_shade"]["variants"][0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.pop("color_change"), r"edits\.yaml: color_change: missing"),
        (lambda e: e.update(colour_change=e["color_change"]), "colour_change: unknown edit type"),
        (lambda e: e.update(weather_change=e["color_change"]), "worded by the instructions"),
        (lambda e: e.update(color_change=["make {it} {new}"]), "expected a mapping"),
        (lambda e: e["color_change"].pop("instructions"), "instructions: missing"),
        (lambda e: e["color_change"].update(instructions=[]), "non-empty list"),
        (lambda e: e["color_change"].update(wordings=["x"]), "color_change.wordings: unknown key"),
        (lambda e: e["color_change"].update(variants=[]), "color_change.variants: unknown key"),
        (
            lambda e: e["color_change"]["instructions"].append("make {it} {colour}"),
            r"color_change\.instructions\[8\]: 'make \{it\} \{colour\}' uses unknown "
            r"placeholders \['colour'\]; it may use \['a_new', 'it', 'it_looks'",
        ),
        (lambda e: e["aging"]["instructions"].append("make {it} {old}"), "unknown placeholders"),
        (lambda e: e["aging"]["instructions"].append("make {it} {}"), r"placeholders \[''\]"),
        (lambda e: e["aging"]["instructions"].append("make {it"), "bad template"),
        (lambda e: e["aging"]["instructions"].append("make {it!x}"), "bad template"),
        (lambda e: e["aging"]["instructions"].append("make {it:d}"), "bad template"),
        (lambda e: e["aging"]["instructions"].append("make it  new"), "stray spaces"),
        (lambda e: e["text_print"]["when"].update(colour={}), "when.colour: unknown placeholder"),
        (
            lambda e: e["text_print"]["when"]["method"].update(paint=["write {txt}"]),
            r"text_print\.when\.method\.paint\[0\]: .* unknown placeholders \['txt'\]",
        ),
        (lambda e: e["color_shade"].pop("variants"), r"color_shade\.variants: missing"),
        (lambda e: _variant(e).pop("verb"), r"color_shade\.variants\[0\]\.verb: missing"),
        (lambda e: _variant(e).update(noun="x"), r"variants\[0\]\.noun: unknown key"),
    ],
)
def test_broken_edits_files_are_refused(tmp_path, change, message):
    edits = _packaged_edits()
    change(edits)
    with pytest.raises(CatalogError, match=message):
        load_catalog(_with_edits(tmp_path, edits))
