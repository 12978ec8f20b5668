"""The catalog's YAML files as pydantic models: the schema every file is validated by.

``common.yaml`` is a :class:`CommonFile`, each category file a :class:`CategoryFile`.
A model checks one file on its own terms (phrases without stray spaces, lists without
duplicates, every surface "on ...", odds adding up) and, through the validation
context, against the shared vocabulary (a category may only use the pattern adjectives
and graphic methods ``common.yaml`` defines). ``catalog.py`` turns validated files into
the frozen data the synthesizer reads.

Every scene phrase carries its *setting*, the fact that keeps a scene self-consistent:
weather is only added outdoors, an indoor lamp never lights a beach, a marble
countertop never stands against a mountain range. See :class:`Setting`.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "ATTRIBUTE_SLOTS",
    "INPUT_ODDS_KEYS",
    "ODDS_GROUPS",
    "CategoryFile",
    "CommonFile",
    "Setting",
    "compatible",
    "scene_setting",
]

# Product attribute slots, in the order they appear before the noun.
ATTRIBUTE_SLOTS = ("condition", "style", "texture", "color", "pattern", "material")
# input_odds keys; each group is a set of alternatives whose odds add up to
# at most 1 (exactly 1 where a caption must have one of them).
ODDS_GROUPS = (
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
    *(key for group, _ in ODDS_GROUPS for key in group),
)


class Setting(StrEnum):
    """Where a scene phrase can be.

    ``studio`` is an indoor set (seamless backdrops, pedestals, studio light): it goes
    with ``indoor`` and ``either`` phrases, never with ``outdoor`` ones. ``either`` fits
    anywhere ("on a wooden table", "in natural light"). Sky phrases (weather, seasons,
    times of day) need a scene that is ``outdoor``, not merely ``either``: "on a wooden
    table, in falling snow" is not a product photo anyone takes.
    """

    INDOOR = "indoor"
    OUTDOOR = "outdoor"
    STUDIO = "studio"
    EITHER = "either"


def compatible(a: Setting, b: Setting) -> bool:
    """Whether two phrases' settings can share one scene."""
    if Setting.EITHER in (a, b):
        return True
    return (a is Setting.OUTDOOR) == (b is Setting.OUTDOOR)


# Most specific first: a scene with one outdoor part is outdoors.
_SPECIFICITY = (Setting.OUTDOOR, Setting.STUDIO, Setting.INDOOR)


def scene_setting(settings: Iterator[Setting] | tuple[Setting, ...]) -> Setting | None:
    """The setting of a scene made of parts with these settings; None if they conflict."""
    present = set(settings)
    if Setting.OUTDOOR in present and present & {Setting.INDOOR, Setting.STUDIO}:
        return None
    return next((s for s in _SPECIFICITY if s in present), Setting.EITHER)


# --- field types -------------------------------------------------------------------


def _phrase(value: str) -> str:
    if not value or value != value.strip() or "  " in value:
        raise ValueError(f"{value!r} must be non-empty without stray spaces")
    return value


def _distinct(values: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(values)) != len(values):
        seen: set[str] = set()
        duplicate = next(v for v in values if v in seen or seen.add(v))
        raise ValueError(f"duplicate values ({duplicate!r})")
    return values


Phrase = Annotated[str, Field(strict=True), AfterValidator(_phrase)]
# A list of distinct phrases, maybe empty ("not applicable to this product").
Phrases = Annotated[tuple[Phrase, ...], AfterValidator(_distinct)]
# A list of distinct phrases with at least one.
SomePhrases = Annotated[tuple[Phrase, ...], Field(min_length=1), AfterValidator(_distinct)]
Odds = Annotated[float, Field(ge=0, le=1, strict=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BySetting(_Model):
    """Phrases grouped by where they can be."""

    indoor: Phrases = ()
    studio: Phrases = ()
    outdoor: Phrases = ()
    either: Phrases = ()

    def items(self) -> Iterator[tuple[str, Setting]]:
        for setting in Setting:
            for phrase in getattr(self, setting.value):
                yield phrase, setting

    def phrases(self) -> tuple[str, ...]:
        return tuple(phrase for phrase, _ in self.items())

    @model_validator(mode="after")
    def _once(self) -> BySetting:
        _distinct(self.phrases())
        return self


class Places(_Model):
    """Named places: a place is never ``either`` (a kitchen is indoors)."""

    indoor: SomePhrases
    studio: Phrases = ()
    outdoor: SomePhrases

    @field_validator("indoor", "studio", "outdoor")
    @classmethod
    def _preposition(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for place in values:
            if not place.startswith(("in ", "at ", "on ")):
                raise ValueError(f"{place!r} must start with 'in', 'at' or 'on'")
        return values


class CueEntry(_Model):
    phrase: Phrase
    name: Phrase | None = None
    noun: Phrase | None = None
    instructions: tuple[Phrase, ...] = ()
    setting: Setting = Setting.EITHER


class ProductEntry(_Model):
    noun: Phrase
    # "pair" / "set" for products sold as more than one piece ("a pair of sneakers").
    unit: Literal["", "pair", "set"] = ""
    # Per-product values; absent: the category's defaults.
    condition: Phrases | None = None
    style: Phrases | None = None
    texture: Phrases | None = None
    color: Phrases | None = None
    pattern: Phrases | None = None
    material: Phrases | None = None


class Defaults(_Model):
    color: Phrases
    material: Phrases = ()
    texture: Phrases = ()
    pattern: Phrases = ()
    style: Phrases = ()
    condition: Phrases = ()

    @field_validator("color")
    @classmethod
    def _some_color(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        if not values:
            raise ValueError("a category needs colors")
        return values


def _context(info: ValidationInfo) -> dict[str, Any]:
    return info.context or {}


class CategoryFile(_Model):
    """One category file (``apparel.yaml``...). Validated with the context
    ``{"patterns", "graphic_methods", "plain_background", "file_stem"}``."""

    name: Phrase
    label: Phrase
    graphic_methods: Phrases = ()
    defaults: Defaults
    products: tuple[ProductEntry, ...] = Field(min_length=1)
    companions: SomePhrases
    surfaces: BySetting
    places: Places
    backgrounds: BySetting = BySetting()

    @field_validator("name")
    @classmethod
    def _matches_file(cls, name: str, info: ValidationInfo) -> str:
        stem = _context(info).get("file_stem")
        if stem is not None and name != stem:
            raise ValueError(f"name {name!r} must match the file name {stem!r}")
        return name

    @field_validator("graphic_methods")
    @classmethod
    def _known_methods(cls, methods: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        known = _context(info).get("graphic_methods")
        for method in methods:
            if known is not None and method not in known:
                raise ValueError(f"unknown method {method!r}")
        return methods

    @field_validator("surfaces")
    @classmethod
    def _on_something(cls, surfaces: BySetting) -> BySetting:
        if not surfaces.phrases():
            raise ValueError("expected a non-empty list")
        for surface in surfaces.phrases():
            if not surface.startswith("on "):
                raise ValueError(f"{surface!r} must start with 'on '")
        return surfaces

    @field_validator("backgrounds")
    @classmethod
    def _not_plain(cls, backgrounds: BySetting, info: ValidationInfo) -> BySetting:
        if _context(info).get("plain_background") in backgrounds.phrases():
            raise ValueError("the plain background is not a regular one")
        return backgrounds

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> CategoryFile:
        nouns = [product.noun for product in self.products]
        if len(set(nouns)) != len(nouns):
            raise ValueError("products: duplicate nouns")
        patterns = _context(info).get("patterns")
        if patterns is not None:
            for product in self.products:
                for adjective in (
                    product.pattern if product.pattern is not None else self.defaults.pattern
                ):
                    if adjective not in patterns:
                        raise ValueError(f"{product.noun}: unknown pattern {adjective!r}")
        scene = [*self.surfaces.phrases(), *self.places.indoor, *self.places.studio]
        scene += self.places.outdoor
        if len(set(scene)) != len(scene):
            raise ValueError("a phrase is listed twice among surfaces and places")
        return self


class InputOdds(_Model):
    """How often a sampled input caption carries each optional part (0..1)."""

    condition: Odds
    style: Odds
    texture: Odds
    color: Odds
    pattern: Odds
    material: Odds
    graphic: Odds
    background: Odds
    companion: Odds
    decor: Odds
    view: Odds
    filter: Odds
    medium: Odds
    surface: Odds
    indoor_place: Odds
    outdoor_place: Odds
    ambient_lighting: Odds
    time_of_day: Odds
    lighting: Odds
    weather: Odds
    season: Odds

    @model_validator(mode="after")
    def _groups(self) -> InputOdds:
        for group, exhaustive in ODDS_GROUPS:
            total = sum(getattr(self, name) for name in group)
            if total > 1 + 1e-9 or (exhaustive and abs(total - 1) > 1e-9):
                need = "add up to 1" if exhaustive else "add up to at most 1"
                raise ValueError(f"{', '.join(group)} must {need}")
        return self


class CommonFile(_Model):
    """``common.yaml``: the vocabulary every category shares."""

    # pattern adjective -> how an instruction names it ("striped" -> "stripes").
    patterns: dict[Phrase, Phrase] = Field(min_length=1)
    # imperative -> participle ("embroider" -> "embroidered").
    graphic_methods: dict[Phrase, Phrase] = Field(min_length=1)
    logos: SomePhrases
    texts: SomePhrases
    weather: tuple[CueEntry, ...] = Field(min_length=1)
    seasons: tuple[CueEntry, ...] = Field(min_length=1)
    times_of_day: tuple[CueEntry, ...] = Field(min_length=1)
    lightings: tuple[CueEntry, ...] = Field(min_length=1)
    ambient_lightings: tuple[CueEntry, ...] = Field(min_length=1)
    mediums: SomePhrases
    views: tuple[CueEntry, ...] = Field(min_length=1)
    filters: tuple[CueEntry, ...] = Field(min_length=1)
    decors: tuple[CueEntry, ...] = Field(min_length=1)
    shadeable_colors: SomePhrases
    # Materials whose own color is the product's ("18k gold"): a caption never puts a
    # color word on them ("a black 18k gold anklet" is no product anyone sells).
    self_colored_materials: Phrases = ()
    # Attribute values that never describe one product together ("brand-new" and
    # "vintage" read as a contradiction).
    exclusive_values: tuple[tuple[Phrase, Phrase], ...] = ()
    plain_background: Phrase
    backgrounds: BySetting
    input_odds: InputOdds

    @field_validator("weather", "filters", "decors")
    @classmethod
    def _worded(cls, cues: tuple[CueEntry, ...]) -> tuple[CueEntry, ...]:
        for cue in cues:
            if not cue.instructions:
                raise ValueError(f"{cue.phrase!r}: instructions: missing")
        return _distinct_cues(cues)

    @field_validator("seasons", "times_of_day", "lightings")
    @classmethod
    def _named(cls, cues: tuple[CueEntry, ...]) -> tuple[CueEntry, ...]:
        for cue in cues:
            if cue.name is None:
                raise ValueError(f"{cue.phrase!r}: name: missing")
        return _distinct_cues(cues)

    @field_validator("ambient_lightings")
    @classmethod
    def _distinct_ambient(cls, cues: tuple[CueEntry, ...]) -> tuple[CueEntry, ...]:
        return _distinct_cues(cues)

    @field_validator("views")
    @classmethod
    def _unworded(cls, cues: tuple[CueEntry, ...]) -> tuple[CueEntry, ...]:
        # Input-only: Prompt-to-Prompt keeps the layout, so no edit changes the view.
        for cue in cues:
            if cue.instructions:
                raise ValueError(
                    f"{cue.phrase!r}: views take no instructions (no edit changes them)"
                )
        return _distinct_cues(cues)

    @model_validator(mode="after")
    def _plain_apart(self) -> CommonFile:
        if self.plain_background in self.backgrounds.phrases():
            raise ValueError("plain_background is also a regular background")
        return self


def _distinct_cues(cues: tuple[CueEntry, ...]) -> tuple[CueEntry, ...]:
    phrases = [cue.phrase for cue in cues]
    if len(set(phrases)) != len(phrases):
        raise ValueError("duplicate phrases")
    return cues
