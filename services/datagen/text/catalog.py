"""The product catalog: hand-written YAML turned into frozen, validated data.

The YAML files are the single place that decides which words may describe
which product, so an edit can only produce a value the catalog allows for
that product ("make it leather" never reaches a smartphone screen unless the
smartphone's materials say so). Everything is checked at load time, so a typo
in a data file fails loudly with its file and key instead of leaking odd
captions into a dataset.

Beside the vocabulary (``common.yaml``) and the categories (one file each),
``edits.yaml`` words the edit types' instructions; the edit types in
``edits.py`` declare which entries and placeholders it must have.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

__all__ = [
    "ATTRIBUTE_SLOTS",
    "Catalog",
    "CatalogError",
    "Category",
    "Cue",
    "EditWording",
    "Product",
    "load_catalog",
]

# Product attribute slots, in the order they appear before the noun.
ATTRIBUTE_SLOTS = ("condition", "style", "texture", "color", "pattern", "material")
UNITS = ("", "pair", "set")
COMMON_FILE = "common.yaml"
EDITS_FILE = "edits.yaml"
# Files beside the category files that are not categories.
_SHARED_FILES = (COMMON_FILE, EDITS_FILE)
# Placeholders for the product that every instruction template may use; an
# edit type's own templates may also use the placeholders it declares.
TEMPLATE_FIELDS = frozenset({"it", "its", "noun", "it_looks"})
# input_odds keys; each group is a set of alternatives whose odds add up to
# at most 1 (exactly 1 where a caption must have one of them).
_ODDS_GROUPS = (
    (("surface", "indoor_place", "outdoor_place"), True),
    (("ambient_lighting", "time_of_day", "lighting"), False),
    (("weather", "season"), False),
)
INPUT_ODDS_KEYS = (
    *ATTRIBUTE_SLOTS,
    "graphic",
    "background",
    "companion",
    "decor",
    "view",
    "filter",
    "medium",
    *(key for group, _ in _ODDS_GROUPS for key in group),
)


class CatalogError(ValueError):
    """A catalog file is missing, malformed or inconsistent."""


@dataclass(frozen=True, slots=True)
class Cue:
    """A value with the words an instruction uses for it.

    ``phrase`` is what the caption says ("in falling snow"); ``name`` is how an
    instruction refers to it ("snow"); ``instructions`` are ready-made
    wordings for value-specific edits such as weather or camera view.
    """

    phrase: str
    name: str = ""
    instructions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EditWording:
    """How one edit type words its instruction: its entry in ``edits.yaml``."""

    instructions: tuple[str, ...]
    # placeholder -> one of its values -> templates that also fit that value.
    when: Mapping[str, Mapping[str, tuple[str, ...]]]
    # Word sets the edit type draws one of per row (``color_shade``: dark/light).
    variants: tuple[Mapping[str, str], ...]

    def templates(self, words: Mapping[str, str]) -> tuple[str, ...]:
        """The templates that fit an edit with these placeholder values."""
        templates = self.instructions
        for placeholder, extra in self.when.items():
            templates += extra.get(words[placeholder], ())
        return templates


@dataclass(frozen=True, slots=True)
class Product:
    noun: str
    # "pair" / "set" for products sold as more than one piece ("a pair of sneakers").
    unit: str
    # Attribute slot -> values allowed for this product; empty means "not applicable".
    values: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Category:
    name: str
    label: str
    products: tuple[Product, ...]
    graphic_methods: tuple[str, ...]
    companions: tuple[str, ...]
    surfaces: tuple[str, ...]
    indoor_places: tuple[str, ...]
    outdoor_places: tuple[str, ...]
    backgrounds: tuple[str, ...]

    @property
    def places(self) -> tuple[str, ...]:
        return self.indoor_places + self.outdoor_places


@dataclass(frozen=True, slots=True)
class Catalog:
    categories: tuple[Category, ...]
    # pattern adjective -> how an instruction names it ("striped" -> "stripes").
    patterns: Mapping[str, str]
    # imperative -> participle ("embroider" -> "embroidered").
    graphic_methods: Mapping[str, str]
    logos: tuple[str, ...]
    texts: tuple[str, ...]
    weather: tuple[Cue, ...]
    seasons: tuple[Cue, ...]
    times_of_day: tuple[Cue, ...]
    lightings: tuple[Cue, ...]
    ambient_lightings: tuple[str, ...]
    mediums: tuple[str, ...]
    views: tuple[Cue, ...]
    filters: tuple[Cue, ...]
    decors: tuple[Cue, ...]
    shadeable_colors: frozenset[str]
    plain_background: str
    # How often a sampled input carries each optional part; see common.yaml.
    input_odds: Mapping[str, float]
    # edit type -> its wording (edits.yaml); none for the edit types whose
    # values bring their own (weather, views, filters, decors).
    edit_wordings: Mapping[str, EditWording]

    def category(self, name: str) -> Category:
        for category in self.categories:
            if category.name == name:
                return category
        raise KeyError(name)

    @property
    def category_names(self) -> tuple[str, ...]:
        return tuple(category.name for category in self.categories)


def load_catalog(directory: str | Path | None = None) -> Catalog:
    """Load and validate the catalog; the packaged one when ``directory`` is None.

    The packaged catalog is parsed once per process and shared, which is safe
    because every part of it is immutable.
    """
    if directory is None:
        return _packaged_catalog()
    return _load_directory(Path(directory))


@functools.cache
def _packaged_catalog() -> Catalog:
    with resources.as_file(resources.files("services.datagen") / "catalog") as path:
        return _load_directory(path, packaged=True)


def _load_directory(directory: Path, *, packaged: bool = False) -> Catalog:
    common_path = directory / COMMON_FILE
    if not common_path.is_file():
        raise CatalogError(f"{directory}: no {COMMON_FILE}")
    common = _Reader(common_path, _read_yaml(common_path))
    patterns = common.string_map("patterns")
    methods = common.string_map("graphic_methods")
    shared_backgrounds = common.strings("backgrounds")
    plain_background = common.string("plain_background")
    if plain_background in shared_backgrounds:
        raise CatalogError(f"{common_path}: plain_background is also a regular background")

    category_paths = sorted(p for p in directory.glob("*.yaml") if p.name not in _SHARED_FILES)
    if not category_paths:
        raise CatalogError(f"{directory}: no category files beside {COMMON_FILE}")
    categories = tuple(
        _load_category(path, patterns, methods, shared_backgrounds, plain_background)
        for path in category_paths
    )

    return Catalog(
        categories=categories,
        patterns=patterns,
        graphic_methods=methods,
        logos=common.strings("logos"),
        texts=common.strings("texts"),
        weather=common.cues("weather", instructions=True),
        seasons=common.cues("seasons", named=True),
        times_of_day=common.cues("times_of_day", named=True),
        lightings=common.cues("lightings", named=True),
        ambient_lightings=common.strings("ambient_lightings"),
        mediums=common.strings("mediums"),
        views=common.cues("views", instructions=True),
        filters=common.cues("filters", instructions=True),
        decors=common.cues("decors", instructions=True),
        shadeable_colors=frozenset(common.strings("shadeable_colors")),
        plain_background=plain_background,
        input_odds=common.odds("input_odds"),
        edit_wordings=_edit_wordings(directory, packaged),
    )


def _edit_wordings(directory: Path, packaged: bool) -> Mapping[str, EditWording]:
    path = directory / EDITS_FILE
    if path.is_file():
        return _load_edit_wordings(path)
    if packaged:
        raise CatalogError(f"{directory}: no {EDITS_FILE}")
    # The wordings follow the code's edit types, not the products: a catalog
    # of other products need not copy them.
    return _packaged_catalog().edit_wordings


def _load_edit_wordings(path: Path) -> Mapping[str, EditWording]:
    # The edit types decide which entries exist and which placeholders each may
    # use. Imported here, not at the top: edits.py builds on this module's types.
    from .edits import EDIT_TYPES

    reader = _Reader(path, _read_yaml(path))
    reader.reject_unknown(tuple(edit.name for edit in EDIT_TYPES), what="edit type")
    wordings = {}
    for edit in EDIT_TYPES:
        if edit.by_cues:
            if edit.name in reader.data:
                raise CatalogError(
                    f"{reader.where(edit.name)}: worded by the instructions of its values "
                    f"in {COMMON_FILE}, not here"
                )
            continue
        entry = reader.child(edit.name)
        fields = TEMPLATE_FIELDS | edit.placeholders
        known = (
            ("instructions", "when", "variants") if edit.variant_keys else ("instructions", "when")
        )
        entry.reject_unknown(known)
        wordings[edit.name] = EditWording(
            instructions=entry.templates("instructions", fields),
            when=entry.conditional_templates("when", edit.placeholders, fields),
            variants=entry.variants("variants", edit.variant_keys) if edit.variant_keys else (),
        )
    return MappingProxyType(wordings)


def _load_category(
    path: Path,
    patterns: Mapping[str, str],
    methods: Mapping[str, str],
    shared_backgrounds: tuple[str, ...],
    plain_background: str,
) -> Category:
    reader = _Reader(path, _read_yaml(path))
    name = reader.string("name")
    if name != path.stem:
        raise CatalogError(f"{path}: name {name!r} must match the file name {path.stem!r}")

    graphic_methods = reader.strings("graphic_methods", allow_empty=True)
    for method in graphic_methods:
        if method not in methods:
            raise CatalogError(f"{path}: graphic_methods: unknown method {method!r}")

    defaults = reader.child("defaults")
    default_values = {slot: defaults.strings(slot, allow_empty=True) for slot in ATTRIBUTE_SLOTS}
    defaults.reject_unknown(ATTRIBUTE_SLOTS)
    if not default_values["color"]:
        raise CatalogError(f"{path}: defaults.color: a category needs colors")

    products = []
    for index, item in enumerate(reader.list("products")):
        entry = _Reader(path, item, f"products[{index}]")
        unit = entry.string("unit", default="")
        if unit not in UNITS:
            raise CatalogError(f"{entry.where('unit')}: must be one of {UNITS}")
        entry.reject_unknown((*ATTRIBUTE_SLOTS, "noun", "unit"))
        values = {
            slot: entry.strings(slot, allow_empty=True) if slot in entry.data else default
            for slot, default in default_values.items()
        }
        for adjective in values["pattern"]:
            if adjective not in patterns:
                raise CatalogError(f"{entry.where('pattern')}: unknown pattern {adjective!r}")
        products.append(Product(entry.string("noun"), unit, MappingProxyType(values)))
    nouns = [product.noun for product in products]
    if len(set(nouns)) != len(nouns):
        raise CatalogError(f"{path}: products: duplicate nouns")

    places = reader.child("places")
    places.reject_unknown(("indoor", "outdoor"))
    surfaces = reader.strings("surfaces")
    indoor, outdoor = places.strings("indoor"), places.strings("outdoor")
    for surface in surfaces:
        if not surface.startswith("on "):
            raise CatalogError(f"{reader.where('surfaces')}: {surface!r} must start with 'on '")
    for place in indoor + outdoor:
        if not place.startswith(("in ", "at ", "on ")):
            raise CatalogError(f"{path}: places: {place!r} must start with 'in', 'at' or 'on'")
    if len(set(surfaces + indoor + outdoor)) != len(surfaces) + len(indoor) + len(outdoor):
        raise CatalogError(f"{path}: a phrase is listed twice among surfaces and places")

    backgrounds = _unique(shared_backgrounds + reader.strings("backgrounds", allow_empty=True))
    if plain_background in backgrounds:
        raise CatalogError(f"{path}: backgrounds: the plain background is not a regular one")

    reader.reject_unknown(
        (
            "name",
            "label",
            "graphic_methods",
            "defaults",
            "products",
            "companions",
            "surfaces",
            "places",
            "backgrounds",
        )
    )
    return Category(
        name=name,
        label=reader.string("label"),
        products=tuple(products),
        graphic_methods=graphic_methods,
        companions=reader.strings("companions"),
        surfaces=surfaces,
        indoor_places=indoor,
        outdoor_places=outdoor,
        backgrounds=backgrounds,
    )


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from exc


def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def _check_phrase(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise CatalogError(f"{where}: expected text, got {type(value).__name__} {value!r}")
    if not value or value != value.strip() or "  " in value:
        raise CatalogError(f"{where}: {value!r} must be non-empty without stray spaces")
    return value


def _check_template(where: str, template: str, fields: frozenset[str] = TEMPLATE_FIELDS) -> str:
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise CatalogError(f"{where}: bad template {template!r}: {exc}") from exc
    unknown = used - fields
    if unknown:
        raise CatalogError(
            f"{where}: {template!r} uses unknown placeholders {sorted(unknown)}; "
            f"it may use {sorted(fields)}"
        )
    try:
        # Conversions and format specs ("{new!x}", "{new:%}") fail only when used.
        template.format_map(dict.fromkeys(fields, "x"))
    except (ValueError, KeyError) as exc:
        raise CatalogError(f"{where}: bad template {template!r}: {exc}") from exc
    return template


class _Reader:
    """Typed access to one mapping of a YAML file, with file/key-path errors."""

    def __init__(self, path: Path, data: Any, prefix: str = "") -> None:
        if not isinstance(data, dict):
            raise CatalogError(f"{path}: {prefix or 'top level'}: expected a mapping")
        self.path, self.data, self.prefix = path, data, prefix

    def where(self, key: str) -> str:
        return f"{self.path}: {self.prefix + '.' if self.prefix else ''}{key}"

    def _get(self, key: str) -> Any:
        if key not in self.data:
            raise CatalogError(f"{self.where(key)}: missing")
        return self.data[key]

    def reject_unknown(self, known: tuple[str, ...], what: str = "key") -> None:
        unknown = set(self.data) - set(known)
        if unknown:
            raise CatalogError(f"{self.where(sorted(map(str, unknown))[0])}: unknown {what}")

    def _key_path(self, key: str) -> str:
        return f"{self.prefix}.{key}".lstrip(".")

    def child(self, key: str) -> _Reader:
        return _Reader(self.path, self._get(key), self._key_path(key))

    def list(self, key: str) -> list[Any]:
        value = self._get(key)
        if not isinstance(value, list) or not value:
            raise CatalogError(f"{self.where(key)}: expected a non-empty list")
        return value

    def string(self, key: str, default: str | None = None) -> str:
        if default is not None and key not in self.data:
            return default
        return _check_phrase(self.where(key), self._get(key))

    def strings(self, key: str, *, allow_empty: bool = False) -> tuple[str, ...]:
        value = self._get(key)
        if not isinstance(value, list) or (not value and not allow_empty):
            raise CatalogError(f"{self.where(key)}: expected a non-empty list")
        items = tuple(_check_phrase(f"{self.where(key)}[{i}]", v) for i, v in enumerate(value))
        if len(set(items)) != len(items):
            raise CatalogError(f"{self.where(key)}: duplicate values")
        return items

    def templates(self, key: str, fields: frozenset[str] = TEMPLATE_FIELDS) -> tuple[str, ...]:
        return tuple(
            _check_template(f"{self.where(key)}[{i}]", template, fields)
            for i, template in enumerate(self.strings(key))
        )

    def conditional_templates(
        self, key: str, placeholders: frozenset[str], fields: frozenset[str]
    ) -> Mapping[str, Mapping[str, tuple[str, ...]]]:
        """``key``: placeholder -> value -> templates; optional."""
        if key not in self.data:
            return MappingProxyType({})
        conditions = self.child(key)
        conditions.reject_unknown(tuple(sorted(placeholders)), what="placeholder")
        when = {}
        for placeholder in conditions.data:
            by_value = conditions.child(placeholder)
            when[placeholder] = MappingProxyType(
                {
                    _check_phrase(by_value.where(str(value)), value): by_value.templates(
                        value, fields
                    )
                    for value in by_value.data
                }
            )
        return MappingProxyType(when)

    def variants(self, key: str, keys: tuple[str, ...]) -> tuple[Mapping[str, str], ...]:
        """A non-empty list of mappings that each give a phrase for exactly ``keys``."""
        variants = []
        for index, item in enumerate(self.list(key)):
            entry = _Reader(self.path, item, f"{self._key_path(key)}[{index}]")
            entry.reject_unknown(keys)
            variants.append(MappingProxyType({name: entry.string(name) for name in keys}))
        return tuple(variants)

    def string_map(self, key: str) -> Mapping[str, str]:
        value = self._get(key)
        if not isinstance(value, dict) or not value:
            raise CatalogError(f"{self.where(key)}: expected a non-empty mapping")
        return MappingProxyType(
            {
                _check_phrase(self.where(key), k): _check_phrase(f"{self.where(key)}.{k}", v)
                for k, v in value.items()
            }
        )

    def odds(self, key: str) -> Mapping[str, float]:
        entry = self.child(key)
        entry.reject_unknown(INPUT_ODDS_KEYS)
        odds = {}
        for name in INPUT_ODDS_KEYS:
            value = entry._get(name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise CatalogError(f"{entry.where(name)}: expected a number from 0 to 1")
            odds[name] = float(value)
        for group, exhaustive in _ODDS_GROUPS:
            total = sum(odds[name] for name in group)
            if total > 1 + 1e-9 or (exhaustive and abs(total - 1) > 1e-9):
                need = "add up to 1" if exhaustive else "add up to at most 1"
                raise CatalogError(f"{self.where(key)}: {', '.join(group)} must {need}")
        return MappingProxyType(odds)

    def cues(self, key: str, *, named: bool = False, instructions: bool = False) -> tuple[Cue, ...]:
        cues = []
        for index, item in enumerate(self.list(key)):
            entry = _Reader(self.path, item, f"{key}[{index}]")
            entry.reject_unknown(("phrase", "name", "noun", "instructions"))
            name = entry.string("name") if named else entry.string("noun", default="")
            wordings = entry.templates("instructions") if instructions else ()
            cues.append(Cue(entry.string("phrase"), name, wordings))
        phrases = [cue.phrase for cue in cues]
        if len(set(phrases)) != len(phrases):
            raise CatalogError(f"{self.where(key)}: duplicate phrases")
        return tuple(cues)
