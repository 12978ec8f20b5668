"""The product catalog: hand-written YAML turned into frozen, validated data.

The YAML files are the single place that decides which words may describe
which product, so an edit can only produce a value the catalog allows for
that product ("make it leather" never reaches a smartphone screen unless the
smartphone's materials say so). Everything is checked at load time by the schema
in ``catalog_schema.py`` (pydantic models of the files), so a typo in a data
file fails loudly with its file and key instead of leaking odd captions into
a dataset.

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
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .catalog_schema import (
    ATTRIBUTE_SLOTS,
    INPUT_ODDS_KEYS,
    CategoryFile,
    CommonFile,
    CueEntry,
    Setting,
)

M = TypeVar("M", bound=BaseModel)

__all__ = [
    "ATTRIBUTE_SLOTS",
    "INPUT_ODDS_KEYS",
    "Catalog",
    "CatalogError",
    "Category",
    "Cue",
    "EditWording",
    "Product",
    "Setting",
    "load_catalog",
]

COMMON_FILE = "common.yaml"
EDITS_FILE = "edits.yaml"
# Files beside the category files that are not categories.
_SHARED_FILES = (COMMON_FILE, EDITS_FILE)
# Placeholders for the product that every instruction template may use; an
# edit type's own templates may also use the placeholders it declares.
TEMPLATE_FIELDS = frozenset({"it", "its", "noun", "it_looks"})


class CatalogError(ValueError):
    """A catalog file is missing, malformed or inconsistent."""


@dataclass(frozen=True, slots=True)
class Cue:
    """A value with the words an instruction uses for it.

    ``phrase`` is what the caption says ("in falling snow"); ``name`` is how an
    instruction refers to it ("snow"); ``instructions`` are ready-made
    wordings for value-specific edits such as weather or camera view;
    ``setting`` is where the phrase can be (lightings: "under warm indoor light"
    is ``indoor``).
    """

    phrase: str
    name: str = ""
    instructions: tuple[str, ...] = ()
    setting: Setting = Setting.EITHER


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


# eq=False: hashed by identity, so per-catalog lookups can be cached.
@dataclass(frozen=True, slots=True, eq=False)
class Category:
    name: str
    label: str
    products: tuple[Product, ...]
    graphic_methods: tuple[str, ...]
    companions: tuple[str, ...]
    surfaces: tuple[str, ...]
    # Places indoors, studio sets included (they take no weather either).
    indoor_places: tuple[str, ...]
    outdoor_places: tuple[str, ...]
    backgrounds: tuple[str, ...]
    # Surface, place or background phrase -> its setting.
    settings: Mapping[str, Setting]

    @property
    def places(self) -> tuple[str, ...]:
        return self.indoor_places + self.outdoor_places

    def setting_of(self, phrase: str) -> Setting:
        """The setting of a surface, place or background of this category."""
        return self.settings[phrase]


# eq=False: hashed by identity, so per-catalog lookups can be cached.
@dataclass(frozen=True, slots=True, eq=False)
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
    ambient_lightings: tuple[Cue, ...]
    mediums: tuple[str, ...]
    views: tuple[Cue, ...]
    filters: tuple[Cue, ...]
    decors: tuple[Cue, ...]
    shadeable_colors: frozenset[str]
    # Materials that are their own color: no color word goes with them.
    self_colored_materials: frozenset[str]
    # Pairs of attribute values that never describe one product together.
    exclusive_values: frozenset[frozenset[str]]
    plain_background: str
    # How often a sampled input carries each optional part; see common.yaml.
    input_odds: Mapping[str, float]
    # edit type -> its wording (edits.yaml); none for the edit types whose
    # values bring their own (weather, views, filters, decors).
    edit_wordings: Mapping[str, EditWording]
    # Lighting-slot phrase (ambient light, named lighting, time of day) -> the setting
    # it needs; times of day are sky phrases: outdoor.
    lighting_settings: Mapping[str, Setting]

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


def _validated(model: type[M], path: Path, context: dict[str, Any] | None = None) -> M:
    """``path``'s YAML validated by ``model``; a CatalogError naming file and key otherwise."""
    data = _read_yaml(path)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise CatalogError(f"{path}: {_describe(exc)}") from exc


# pydantic error type -> our wording (the rest keep pydantic's message).
_WORDING = {
    "extra_forbidden": "unknown key",
    "missing": "missing",
    "too_short": "expected a non-empty list",
    "tuple_type": "expected a non-empty list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "string_type": "expected text",
    "less_than_equal": "expected a number from 0 to 1",
    "greater_than_equal": "expected a number from 0 to 1",
}


def _describe(exc: ValidationError) -> str:
    """The first error as "key.path[0]: what is wrong"."""
    error = exc.errors(include_url=False)[0]
    parts = []
    for item in error["loc"]:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item not in _UNION_BRANCHES:
            parts.append(("." if parts else "") + str(item))
    where = "".join(parts) or "top level"
    kind = error["type"]
    if kind == "literal_error":
        message = f"must be one of {error['ctx']['expected']}"
    elif kind in _WORDING:
        message = _WORDING[kind]
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}"


# Location parts pydantic adds for Optional/union fields; not keys of the file.
_UNION_BRANCHES = frozenset({"tuple[str, ...]", "none", "function-after[_phrase(), str]"})


def _load_directory(directory: Path, *, packaged: bool = False) -> Catalog:
    common_path = directory / COMMON_FILE
    if not common_path.is_file():
        raise CatalogError(f"{directory}: no {COMMON_FILE}")
    common = _validated(CommonFile, common_path)

    category_paths = sorted(p for p in directory.glob("*.yaml") if p.name not in _SHARED_FILES)
    if not category_paths:
        raise CatalogError(f"{directory}: no category files beside {COMMON_FILE}")
    categories = tuple(_category(path, common) for path in category_paths)

    lighting_settings = {cue.phrase: cue.setting for cue in common.ambient_lightings}
    lighting_settings |= {cue.phrase: cue.setting for cue in common.lightings}
    lighting_settings |= {cue.phrase: Setting.OUTDOOR for cue in common.times_of_day}
    return Catalog(
        categories=categories,
        patterns=MappingProxyType(dict(common.patterns)),
        graphic_methods=MappingProxyType(dict(common.graphic_methods)),
        logos=common.logos,
        texts=common.texts,
        weather=_cues(f"{common_path}: weather", common.weather, name_from="noun"),
        seasons=_cues(f"{common_path}: seasons", common.seasons),
        times_of_day=_cues(f"{common_path}: times_of_day", common.times_of_day),
        lightings=_cues(f"{common_path}: lightings", common.lightings),
        ambient_lightings=_cues(f"{common_path}: ambient_lightings", common.ambient_lightings),
        mediums=common.mediums,
        views=_cues(f"{common_path}: views", common.views),
        filters=_cues(f"{common_path}: filters", common.filters),
        decors=_cues(f"{common_path}: decors", common.decors),
        shadeable_colors=frozenset(common.shadeable_colors),
        self_colored_materials=frozenset(common.self_colored_materials),
        exclusive_values=frozenset(frozenset(pair) for pair in common.exclusive_values),
        plain_background=common.plain_background,
        input_odds=MappingProxyType(common.input_odds.model_dump()),
        edit_wordings=_edit_wordings(directory, packaged),
        lighting_settings=MappingProxyType(lighting_settings),
    )


def _cues(where: str, entries: tuple[CueEntry, ...], name_from: str = "name") -> tuple[Cue, ...]:
    cues = []
    for index, entry in enumerate(entries):
        templates = tuple(
            _check_template(f"{where}[{index}].instructions[{i}]", template)
            for i, template in enumerate(entry.instructions)
        )
        cues.append(Cue(entry.phrase, getattr(entry, name_from) or "", templates, entry.setting))
    return tuple(cues)


def _category(path: Path, common: CommonFile) -> Category:
    context = {
        "patterns": common.patterns,
        "graphic_methods": common.graphic_methods,
        "plain_background": common.plain_background,
        "file_stem": path.stem,
    }
    file = _validated(CategoryFile, path, context)
    defaults = file.defaults.model_dump()
    products = tuple(
        Product(
            product.noun,
            product.unit,
            MappingProxyType(
                {
                    slot: own if (own := getattr(product, slot)) is not None else defaults[slot]
                    for slot in ATTRIBUTE_SLOTS
                }
            ),
        )
        for product in file.products
    )
    settings: dict[str, Setting] = dict(file.surfaces.items())
    settings |= dict(common.backgrounds.items())
    settings |= dict(file.backgrounds.items())
    places = file.places
    settings |= dict.fromkeys(places.indoor, Setting.INDOOR)
    settings |= dict.fromkeys(places.studio, Setting.STUDIO)
    settings |= dict.fromkeys(places.outdoor, Setting.OUTDOOR)
    settings[common.plain_background] = Setting.STUDIO
    backgrounds = tuple(dict.fromkeys(common.backgrounds.phrases() + file.backgrounds.phrases()))
    return Category(
        name=file.name,
        label=file.label,
        products=products,
        graphic_methods=file.graphic_methods,
        companions=file.companions,
        surfaces=file.surfaces.phrases(),
        indoor_places=places.indoor + places.studio,
        outdoor_places=places.outdoor,
        backgrounds=backgrounds,
        settings=MappingProxyType(settings),
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
    # use, so this file's schema is built from them rather than declared as a model.
    # Imported here, not at the top: edits.py builds on this module's types.
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


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from exc


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

    def string(self, key: str) -> str:
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
