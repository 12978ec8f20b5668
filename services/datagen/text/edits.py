"""Edit types: what an instruction changes, and the words it is said with.

An edit never writes the output caption itself. It returns new values for a
few slots plus an instruction; the synthesizer renders the output caption
from the changed slots. So the output caption is exact by construction, and
it differs from the input caption only in the phrases of the changed slots.

Each edit type has:

* ``supports`` - whether the catalog gives a product enough values for the
  edit (no material change for a product with a single allowed material);
* ``prepare`` - adjusts a freshly sampled input so the edit applies (an
  object must be in the picture before it can be removed, weather is only
  added outside);
* ``apply`` - picks the new value(s) and words the instruction with one of
  the templates of its entry in ``catalog/edits.yaml``, filling in the
  placeholders it declares (weather, camera views, filters and decorations
  take the wordings of their values in ``common.yaml`` instead).

Most edits change one slot. A few clear slots that would contradict the new
one (moving indoors stops the rain; a new season replaces the weather; a
plain white background drops the scene), and those show up in the row's
``changed_slots``.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

from .articles import with_article
from .catalog import Catalog, Category, Cue, EditWording, Product
from .catalog_schema import Setting, compatible
from .choices import free_choice
from .coherence import fitting, lighting_fits, setting_of_scene
from .lexicon import close_repeat, content_stems

__all__ = [
    "BRAND_NEW",
    "DEFAULT_EDIT_TYPES",
    "EDIT_TYPES",
    "EDIT_TYPE_NAMES",
    "Edit",
    "EditContext",
    "EditType",
    "edit_type",
    "resolve_edit_types",
]

T = TypeVar("T")

BRAND_NEW = "brand-new"
_GRAPHIC_PATTERN = re.compile(r"^(?:an? )?(?P<what>.+) (?P<participle>\S+) on (?:it|them)$")
_QUOTED_TEXT = re.compile(r"^the (?:word|text) '(?P<text>.+)'$")


@dataclass(slots=True)
class EditContext:
    """One draw: the product, its input slots and the random source.

    ``prepare`` may adjust ``slots``; ``apply`` must only read them.
    """

    rng: random.Random
    catalog: Catalog
    category: Category
    product: Product
    slots: dict[str, str]
    # Whether a graphic may be exact text (only where lettering edits are asked for).
    lettering: bool = False

    @property
    def plural(self) -> bool:
        return bool(self.product.unit)

    def words(self) -> dict[str, str]:
        """The placeholders every instruction template may use (do not mutate)."""
        return _product_words(self.product.noun, self.product.unit)

    def pick(self, slot: str, values: tuple[str, ...]) -> str | None:
        return free_choice(self.rng, values, self.slots, slot)

    def choice(self, values: Sequence[T]) -> T:
        # random() indexing: cheaper than rng.choice() on this hot path.
        return values[int(self.rng.random() * len(values))]

    def edit(
        self,
        changes: Mapping[str, str],
        wording: EditWording,
        *,
        shade_of_old: bool = False,
        **words: str,
    ) -> Edit | None:
        """Word the edit with one of the templates ``wording`` has for ``words``.

        Templates that mention the old value ("{old}") only fit when there
        was one, so they are skipped when the slot was empty.
        """
        templates = wording.templates(words)
        old, new = words.get("old"), words.get("new")
        # Without an old value, or with one that shares a word with the new one
        # ("from royal blue to sky blue"), name only the new value; a shade of the old
        # color ("red" -> "dark red") is the exception: it is worded by the old one.
        shared = new and not content_stems(old or "").isdisjoint(content_stems(new))
        if not old or (shared and not shade_of_old):
            templates = _without_old_value(templates)
        return self._worded(changes, templates, self.words() | words)

    def _worded(
        self, changes: Mapping[str, str], templates: tuple[str, ...], words: Mapping[str, str]
    ) -> Edit | None:
        """The edit with a random template whose wording repeats no word ("print a paw
        print on it" is skipped for "stamp a paw print on it"); None if every one does."""
        start = int(self.rng.random() * len(templates))
        for offset in range(len(templates)):
            instruction = templates[(start + offset) % len(templates)].format_map(words)
            if not close_repeat(instruction):
                return Edit(dict(changes), instruction)
        return None

    def noun_phrase(self, adjective: str) -> str:
        """ "leather" -> "a leather handbag" / "leather sneakers"."""
        phrase = f"{adjective} {self.product.noun}"
        return phrase if self.plural else with_article(phrase)

    def fitting(self, slot: str, values: Sequence[str], **also: str) -> tuple[str, ...]:
        """The values of ``slot`` that keep the scene coherent (``also``: what the edit
        sets besides)."""
        return fitting(self.catalog, self.category, self.slots, slot, values, **also)

    def setting(self) -> Setting | None:
        return setting_of_scene(self.category, self.slots)

    def outdoors(self) -> bool:
        return self.setting() is Setting.OUTDOOR

    def move_outdoors(self) -> None:
        """Weather, seasons and times of day happen under the sky: make the input's scene
        an outdoor one (an outdoor surface, or an outdoor place), dropping a backdrop or
        lighting that only fits indoors. The input caption is written after this, so it
        says the new scene; the edit itself changes only its own slot."""
        if self.outdoors():
            return
        slots, category = self.slots, self.category
        outdoor_surfaces = _outdoor_surfaces(category)
        if slots["place"] or not outdoor_surfaces:
            slots.update(place=self.choice(category.outdoor_places), surface="", background="")
        else:
            slots["surface"] = self.choice(outdoor_surfaces)
            background = slots["background"]
            if background and not compatible(category.settings[background], Setting.OUTDOOR):
                slots["background"] = ""
        lighting = slots["lighting"]
        if lighting and not lighting_fits(self.catalog, lighting, Setting.OUTDOOR):
            slots["lighting"] = ""


@functools.cache
def _outdoor_surfaces(category: Category) -> tuple[str, ...]:
    return tuple(s for s in category.surfaces if category.settings[s] is Setting.OUTDOOR)


@functools.cache
def _product_words(noun: str, unit: str) -> dict[str, str]:
    plural = bool(unit)
    return {
        "it": "them" if plural else "it",
        "its": "their" if plural else "its",
        "noun": noun,
        "it_looks": "they look" if plural else "it looks",
    }


@functools.cache
def _without_old_value(templates: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(t for t in templates if "{old" not in t)


@dataclass(frozen=True, slots=True)
class Edit:
    changes: dict[str, str]
    instruction: str


# Picks the new value(s) and words the edit with the edit type's wording.
Draw = Callable[[EditContext, EditWording], Edit | None]
# What the edit types worded by their values' own instructions get.
_WORDED_BY_CUES = EditWording(instructions=(), when=MappingProxyType({}), variants=())


@dataclass(frozen=True, slots=True)
class EditType:
    name: str
    # The slot the edit is about; the doc table groups by it.
    slot: str
    summary: str
    draw: Draw
    prepare: Callable[[EditContext], None]
    supports: Callable[[Catalog, Category, Product], bool]
    # The placeholders ``draw`` fills in: its templates in edits.yaml may use
    # these besides the product's ({it}, {noun}...).
    placeholders: frozenset[str]
    # The keys of each of its ``variants`` in edits.yaml; empty: it has none.
    variant_keys: tuple[str, ...]
    # Worded by the instructions of the values it sets (weather, filters...
    # in common.yaml), so it has no entry in edits.yaml.
    by_cues: bool
    # Part of a run unless asked otherwise; off for edits Stable Diffusion 1.5
    # renders badly (exact lettering), which a run must ask for by name.
    default_enabled: bool = True
    # Why a picture can show this edit with the layout kept (docs/DATAGEN.md's table).
    why: str = ""

    def apply(self, ctx: EditContext) -> Edit | None:
        """The new value(s) and the instruction; None when this input cannot take the edit."""
        return self.draw(ctx, ctx.catalog.edit_wordings.get(self.name, _WORDED_BY_CUES))


_REGISTRY: dict[str, EditType] = {}


def _always(catalog: Catalog, category: Category, product: Product) -> bool:
    return True


def _nothing_to_prepare(ctx: EditContext) -> None:
    return None


def _needs_values(slot: str, count: int) -> Callable[[Catalog, Category, Product], bool]:
    def supports(catalog: Catalog, category: Category, product: Product) -> bool:
        return len(product.values[slot]) >= count

    return supports


def _needs_graphic_methods(catalog: Catalog, category: Category, product: Product) -> bool:
    return bool(category.graphic_methods)


def _needs_two_companions(catalog: Catalog, category: Category, product: Product) -> bool:
    return len(category.companions) >= 2


def edit_type(
    name: str,
    slot: str,
    summary: str,
    *,
    placeholders: tuple[str, ...] = (),
    variant_keys: tuple[str, ...] = (),
    by_cues: bool = False,
    default_enabled: bool = True,
    why: str = "",
    prepare: Callable[[EditContext], None] = _nothing_to_prepare,
    supports: Callable[[Catalog, Category, Product], bool] = _always,
) -> Callable[[Draw], Draw]:
    """Register ``draw`` as an edit type; registration order is the public order.

    ``draw`` picks the new value(s) and words the edit with the edit type's
    entry in edits.yaml, filling in ``placeholders``.
    """

    def register(draw: Draw) -> Draw:
        if name in _REGISTRY:
            raise ValueError(f"edit type {name!r} registered twice")
        _REGISTRY[name] = EditType(
            name,
            slot,
            summary,
            draw,
            prepare,
            supports,
            frozenset(placeholders),
            variant_keys,
            by_cues,
            default_enabled,
            why,
        )
        return draw

    return register


def _the(phrase: str) -> str:
    """ "a plaid pattern" -> "the plaid pattern"; "stripes" -> "the stripes"."""
    for article in ("a ", "an "):
        if phrase.startswith(article):
            return "the " + phrase[len(article) :]
    return "the " + phrase


def _cue_named(cues: tuple[Cue, ...], phrase: str) -> Cue | None:
    return next((cue for cue in cues if cue.phrase == phrase), None)


def _other_cue(ctx: EditContext, cues: tuple[Cue, ...], current: str) -> Cue | None:
    others = [cue for cue in cues if cue.phrase != current]
    return ctx.choice(others) if others else None


def _cue_edit(ctx: EditContext, slot: str, cue: Cue, **clear: str) -> Edit | None:
    return ctx._worded({slot: cue.phrase, **clear}, cue.instructions, ctx.words())


# --- product attributes ----------------------------------------------------


def _prepare_colorable(ctx: EditContext) -> None:
    """A color word needs a material that is not its own color ("18k gold")."""
    if ctx.slots["material"] in ctx.catalog.self_colored_materials:
        ctx.slots["material"] = ""


@edit_type(
    "color_change",
    "color",
    "Recolor the product.",
    prepare=_prepare_colorable,
    supports=_needs_values("color", 2),
    placeholders=("old", "new", "a_new"),
    why=(
        "A new color is a large, local change of the product's own pixels; attention injection "
        "keeps its shape."
    ),
)
def _color_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    old, new = ctx.slots["color"], ctx.pick("color", ctx.product.values["color"])
    if new is None:
        return None
    return ctx.edit({"color": new}, wording, old=old, new=new, a_new=with_article(new))


def _prepare_shadeable_color(ctx: EditContext) -> None:
    _prepare_colorable(ctx)
    if ctx.slots["color"] not in ctx.catalog.shadeable_colors:
        shadeable = tuple(
            c for c in ctx.product.values["color"] if c in ctx.catalog.shadeable_colors
        )
        ctx.slots["color"] = ctx.pick("color", shadeable) or ""


def _has_shadeable_color(catalog: Catalog, category: Category, product: Product) -> bool:
    return any(color in catalog.shadeable_colors for color in product.values["color"])


@edit_type(
    "color_shade",
    "color",
    "Make the color darker or lighter.",
    prepare=_prepare_shadeable_color,
    supports=_has_shadeable_color,
    placeholders=("old", "new", "comparative", "verb"),
    variant_keys=("shade", "comparative", "verb"),
    why=(
        "Same as a recolor, in one direction (darker/lighter); only colors that read with "
        "dark/light."
    ),
)
def _color_shade(ctx: EditContext, wording: EditWording) -> Edit | None:
    old = ctx.slots["color"]
    if old not in ctx.catalog.shadeable_colors:
        return None
    shade = ctx.choice(wording.variants)
    new = f"{shade['shade']} {old}"
    return ctx.edit(
        {"color": new},
        wording,
        shade_of_old=True,
        old=old,
        new=new,
        comparative=shade["comparative"],
        verb=shade["verb"],
    )


@edit_type(
    "material_change",
    "material",
    "Make the product from another material the catalog allows for it.",
    supports=_needs_values("material", 2),
    placeholders=("old", "new", "new_product"),
    why=(
        "Materials the catalog allows for the product look different (leather vs canvas); a "
        "metal that is its own color drops the color word."
    ),
)
def _material_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    old, new = ctx.slots["material"], ctx.pick("material", ctx.product.values["material"])
    if new is None:
        return None
    changes = {"material": new}
    if new in ctx.catalog.self_colored_materials:
        # "make it 18k gold": the metal is the color now.
        changes["color"] = ""
    return ctx.edit(changes, wording, old=old, new=new, new_product=ctx.noun_phrase(new))


@edit_type(
    "texture_change",
    "texture",
    "Change the surface finish or texture.",
    supports=_needs_values("texture", 2),
    placeholders=("old", "new", "a_new"),
    why=(
        "Finishes visible at product-photo scale (quilted, glossy, distressed); per-product "
        "lists, no fabric finishes on hard goods."
    ),
)
def _texture_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    old, new = ctx.slots["texture"], ctx.pick("texture", ctx.product.values["texture"])
    if new is None:
        return None
    return ctx.edit({"texture": new}, wording, old=old, new=new, a_new=with_article(new))


@edit_type(
    "pattern_change",
    "pattern",
    "Add a pattern or print, or swap the one it has.",
    supports=_needs_values("pattern", 2),
    placeholders=("old", "new", "pattern", "old_pattern"),
    why="A print or pattern covers the product's surface; its outline stays.",
)
def _pattern_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    old, new = ctx.slots["pattern"], ctx.pick("pattern", ctx.product.values["pattern"])
    if new is None:
        return None
    patterns = ctx.catalog.patterns
    return ctx.edit(
        {"pattern": new},
        wording,
        old=old,
        new=new,
        pattern=patterns[new],
        old_pattern=_the(patterns[old]) if old else "",
    )


def _prepare_pattern(ctx: EditContext) -> None:
    if not ctx.slots["pattern"]:
        ctx.slots["pattern"] = ctx.pick("pattern", ctx.product.values["pattern"]) or ""


@edit_type(
    "pattern_removal",
    "pattern",
    "Remove the pattern: a solid, plain product.",
    prepare=_prepare_pattern,
    supports=_needs_values("pattern", 1),
    placeholders=("old", "old_pattern"),
    why="The pattern goes, the product stays: a plain surface is easy to render.",
)
def _pattern_removal(ctx: EditContext, wording: EditWording) -> Edit | None:
    old = ctx.slots["pattern"]
    if not old:
        return None
    return ctx.edit({"pattern": ""}, wording, old=old, old_pattern=_the(ctx.catalog.patterns[old]))


def logo_graphic(ctx: EditContext, method: str, logo: str) -> str:
    """Slot value for a logo: "a Spider-Man logo printed on it"."""
    participle = ctx.catalog.graphic_methods[method]
    return f"{with_article(logo)} {participle} on {ctx.words()['it']}"


def _quoted(text: str) -> str:
    return f"the {'text' if ' ' in text else 'word'} '{text}'"


def text_graphic(ctx: EditContext, method: str, text: str) -> str:
    """Slot value for lettering: "the word 'LOVE' embroidered on it"."""
    participle = ctx.catalog.graphic_methods[method]
    return f"{_quoted(text)} {participle} on {ctx.words()['it']}"


@edit_type(
    "logo_print",
    "graphic",
    "Print, embroider or engrave a logo on the product.",
    supports=_needs_graphic_methods,
    placeholders=("method", "a_logo", "a_done_logo"),
    why="A logo or emblem is a small, local addition SD 1.5 draws well.",
)
def _logo_print(ctx: EditContext, wording: EditWording) -> Edit | None:
    method = ctx.choice(ctx.category.graphic_methods)
    logo = ctx.choice(ctx.catalog.logos)
    new = logo_graphic(ctx, method, logo)
    if new == ctx.slots["graphic"]:
        return None
    participle = ctx.catalog.graphic_methods[method]
    return ctx.edit(
        {"graphic": new},
        wording,
        method=method,
        a_logo=with_article(logo),
        a_done_logo=with_article(f"{participle} {logo}"),
    )


@edit_type(
    "text_print",
    "graphic",
    "Put exact lettering on the product (off by default: SD 1.5 cannot spell).",
    supports=_needs_graphic_methods,
    default_enabled=False,
    placeholders=("method", "text", "quoted"),
    why=(
        "Off by default: SD 1.5 cannot spell, so 'LOVE' comes out as glyph soup; opt in with "
        "edit_types."
    ),
)
def _text_print(ctx: EditContext, wording: EditWording) -> Edit | None:
    method = ctx.choice(ctx.category.graphic_methods)
    text = ctx.choice(ctx.catalog.texts)
    new = text_graphic(ctx, method, text)
    if new == ctx.slots["graphic"]:
        return None
    # Printed or painted lettering gets "write ..." wordings too (the entry's `when`).
    return ctx.edit({"graphic": new}, wording, method=method, text=text, quoted=_quoted(text))


def _prepare_graphic(ctx: EditContext) -> None:
    if not ctx.slots["graphic"]:
        method = ctx.choice(ctx.category.graphic_methods)
        if not ctx.lettering or ctx.rng.random() < 0.5:
            ctx.slots["graphic"] = logo_graphic(ctx, method, ctx.choice(ctx.catalog.logos))
        else:
            ctx.slots["graphic"] = text_graphic(ctx, method, ctx.choice(ctx.catalog.texts))


@edit_type(
    "print_removal",
    "graphic",
    "Remove the logo or lettering.",
    prepare=_prepare_graphic,
    supports=_needs_graphic_methods,
    placeholders=("what", "participle"),
    why="Removing a logo leaves a plain surface; with lettering opt-in only, inputs carry logos.",
)
def _print_removal(ctx: EditContext, wording: EditWording) -> Edit | None:
    match = _GRAPHIC_PATTERN.match(ctx.slots["graphic"])
    if match is None:
        return None
    what, participle = match["what"], match["participle"]
    if quoted := _QUOTED_TEXT.match(what):
        what = f"'{quoted['text']}' text"
    return ctx.edit({"graphic": ""}, wording, what=what, participle=participle)


@edit_type(
    "style_change",
    "style",
    "Restyle the product's design.",
    supports=_needs_values("style", 2),
    placeholders=("old", "new", "a_new", "new_product"),
    why=(
        "Only styles with a visible look (vintage, chunky, cropped); non-visual ones (unisex, "
        "wireless, eco-friendly) are not in the catalog."
    ),
)
def _style_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    old, new = ctx.slots["style"], ctx.pick("style", ctx.product.values["style"])
    if new is None:
        return None
    return ctx.edit(
        {"style": new},
        wording,
        old=old,
        new=new,
        a_new=with_article(new),
        new_product=ctx.noun_phrase(new),
    )


def _aged_conditions(product: Product) -> tuple[str, ...]:
    return tuple(c for c in product.values["condition"] if c != BRAND_NEW)


@edit_type(
    "aging",
    "condition",
    "Make the product look used: worn, scuffed, dusty...",
    supports=_needs_values("condition", 1),
    placeholders=("new", "a_new"),
    why="Wear (scuffed, faded, rusty) is a visible surface change that keeps the layout.",
)
def _aging(ctx: EditContext, wording: EditWording) -> Edit | None:
    new = ctx.pick("condition", _aged_conditions(ctx.product))
    if new is None:
        return None
    return ctx.edit({"condition": new}, wording, new=new, a_new=with_article(new))


def _prepare_worn(ctx: EditContext) -> None:
    if ctx.slots["condition"] in ("", BRAND_NEW):
        ctx.slots["condition"] = ctx.pick("condition", _aged_conditions(ctx.product)) or ""


@edit_type(
    "restoration",
    "condition",
    "Make a used-looking product look brand-new.",
    prepare=_prepare_worn,
    supports=_needs_values("condition", 1),
    placeholders=("old",),
    why="The reverse of aging: a used look becomes new.",
)
def _restoration(ctx: EditContext, wording: EditWording) -> Edit | None:
    old = ctx.slots["condition"]
    if old in ("", BRAND_NEW):
        return None
    return ctx.edit({"condition": BRAND_NEW}, wording, old=old)


# --- scene ------------------------------------------------------------------


@edit_type(
    "surface_change",
    "surface",
    "Put the product on another surface.",
    placeholders=("new", "onto"),
    why=(
        "A new surface under the product, chosen to fit the scene's setting (no marble "
        "countertop in the rain)."
    ),
)
def _surface_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    new = ctx.pick("surface", ctx.fitting("surface", ctx.category.surfaces, place=""))
    if new is None:
        return None
    return ctx.edit(
        # A surface and a place are alternatives ("on sand" vs "in a stadium").
        {"surface": new, "place": ""},
        wording,
        new=new,
        onto="onto " + new.removeprefix("on "),
    )


@edit_type(
    "place_change",
    "place",
    "Move the product to another place.",
    placeholders=("new",),
    why="A new place around the product, chosen to fit its lighting and sky.",
)
def _place_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    places = ctx.fitting("place", ctx.category.places, surface="", background="")
    new = ctx.pick("place", places)
    if new is None:
        return None
    return ctx.edit({"place": new, "surface": "", "background": ""}, wording, new=new)


@edit_type(
    "background_change",
    "background",
    "Replace what is behind the product.",
    placeholders=("new",),
    why="A new backdrop behind the product, compatible with the surface's setting.",
)
def _background_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    new = ctx.pick("background", ctx.fitting("background", ctx.category.backgrounds, place=""))
    if new is None:
        return None
    return ctx.edit({"background": new, "place": ""}, wording, new=new)


@edit_type(
    "background_removal",
    "background",
    "Cut the product out onto a plain white background.",
    placeholders=("plain",),
    why="A studio cut-out: the scene, sky and time of day go, the product stays.",
)
def _background_removal(ctx: EditContext, wording: EditWording) -> Edit | None:
    plain = ctx.catalog.plain_background
    if ctx.slots["background"] == plain:
        return None
    # A cut-out keeps the product (and what stands next to it), not the scene.
    changes = {"background": plain, "surface": "", "place": "", "weather": "", "season": ""}
    changes["decor"] = ""
    lighting = ctx.slots["lighting"]
    if lighting and not lighting_fits(ctx.catalog, lighting, Setting.STUDIO):
        changes["lighting"] = ""  # no sunset behind a white sweep
    return ctx.edit(changes, wording, plain=plain)


def _prepare_outdoors(ctx: EditContext) -> None:
    ctx.move_outdoors()


@edit_type(
    "weather_change",
    "weather",
    "Add weather: snow, rain, fog...",
    prepare=_prepare_outdoors,
    by_cues=True,
    why=(
        "Only outdoors (the input is moved outdoors and indoor light dropped first): snow or "
        "rain over an open scene."
    ),
)
def _weather_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    if not ctx.outdoors():
        return None
    cue = _other_cue(ctx, ctx.catalog.weather, ctx.slots["weather"])
    if cue is None:
        return None
    # Weather and season clauses contradict each other ("in the snow, in summer").
    return _cue_edit(ctx, "weather", cue, season="")


def _prepare_weather(ctx: EditContext) -> None:
    ctx.move_outdoors()
    if not ctx.slots["weather"]:
        ctx.slots["weather"] = ctx.choice(ctx.catalog.weather).phrase
        ctx.slots["season"] = ""


@edit_type(
    "weather_clearing",
    "weather",
    "Clear the weather away.",
    prepare=_prepare_weather,
    placeholders=("weather",),
    why="Only outdoors: the weather goes, the scene stays.",
)
def _weather_clearing(ctx: EditContext, wording: EditWording) -> Edit | None:
    cue = _cue_named(ctx.catalog.weather, ctx.slots["weather"])
    if cue is None or not ctx.outdoors():
        return None
    return ctx.edit({"weather": ""}, wording, weather=cue.name or "weather")


@edit_type(
    "season_change",
    "season",
    "Change the season.",
    prepare=_prepare_outdoors,
    placeholders=("name", "phrase"),
    why="Only outdoors: foliage, snow and light show the season.",
)
def _season_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    if not ctx.outdoors():
        return None
    cue = _other_cue(ctx, ctx.catalog.seasons, ctx.slots["season"])
    if cue is None:
        return None
    return ctx.edit(
        {"season": cue.phrase, "weather": ""}, wording, name=cue.name, phrase=cue.phrase
    )


@edit_type(
    "time_of_day_change",
    "lighting",
    "Change the time of day (outdoors).",
    prepare=_prepare_outdoors,
    placeholders=("name", "phrase"),
    why="Only outdoors: sky color and light direction show the time of day.",
)
def _time_of_day_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    if not ctx.outdoors():
        return None
    cue = _other_cue(ctx, ctx.catalog.times_of_day, ctx.slots["lighting"])
    if cue is None:
        return None
    return ctx.edit({"lighting": cue.phrase}, wording, name=cue.name, phrase=cue.phrase)


@edit_type(
    "lighting_change",
    "lighting",
    "Relight the scene: studio, neon, candlelight...",
    placeholders=("name", "phrase"),
    why=(
        "Only lights that fit the setting (no studio light on a beach); light changes color and"
        " shadows, not the layout."
    ),
)
def _lighting_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    setting = ctx.setting()
    if setting is None:
        return None
    lightings = _lightings_for(ctx.catalog, setting)
    cue = _other_cue(ctx, lightings, ctx.slots["lighting"])
    if cue is None:
        return None
    return ctx.edit({"lighting": cue.phrase}, wording, name=cue.name, phrase=cue.phrase)


@functools.cache
def _lightings_for(catalog: Catalog, setting: Setting) -> tuple[Cue, ...]:
    return tuple(c for c in catalog.lightings if lighting_fits(catalog, c.phrase, setting))


def _prepare_no_companion(ctx: EditContext) -> None:
    ctx.slots["companion"] = ""


@edit_type(
    "object_addition",
    "companion",
    "Add an object next to the product.",
    prepare=_prepare_no_companion,
    placeholders=("a_new",),
    why="One familiar object next to the product: a local addition.",
)
def _object_addition(ctx: EditContext, wording: EditWording) -> Edit | None:
    if ctx.slots["companion"]:
        return None
    new = ctx.pick("companion", ctx.category.companions)
    if new is None:
        return None
    return ctx.edit({"companion": new}, wording, a_new=with_article(new))


def _prepare_companion(ctx: EditContext) -> None:
    if not ctx.slots["companion"]:
        ctx.slots["companion"] = ctx.pick("companion", ctx.category.companions) or ""


@edit_type(
    "object_replacement",
    "companion",
    "Swap the object next to the product for another.",
    prepare=_prepare_companion,
    supports=_needs_two_companions,
    placeholders=("old", "a_new"),
    why="One object swapped for another of similar size.",
)
def _object_replacement(ctx: EditContext, wording: EditWording) -> Edit | None:
    old = ctx.slots["companion"]
    new = ctx.pick("companion", ctx.category.companions)
    if not old or new is None:
        return None
    return ctx.edit({"companion": new}, wording, old=old, a_new=with_article(new))


@edit_type(
    "object_removal",
    "companion",
    "Remove the object next to the product.",
    prepare=_prepare_companion,
    placeholders=("old",),
    why="One object removed; the product and scene stay.",
)
def _object_removal(ctx: EditContext, wording: EditWording) -> Edit | None:
    old = ctx.slots["companion"]
    if not old:
        return None
    return ctx.edit({"companion": ""}, wording, old=old)


@edit_type(
    "festive_decor",
    "decor",
    "Surround the product with themed decorations.",
    by_cues=True,
    why=(
        "Props around the product (ornaments, confetti): a visible addition that keeps the product."
    ),
)
def _festive_decor(ctx: EditContext, wording: EditWording) -> Edit | None:
    cue = _other_cue(ctx, ctx.catalog.decors, ctx.slots["decor"])
    return None if cue is None else _cue_edit(ctx, "decor", cue)


# --- the picture as a whole -------------------------------------------------


# No camera-view edit: Prompt-to-Prompt keeps the input's layout by injecting its
# attention maps, so "show it from above" comes out as the same picture, and an
# editor trained on such pairs learns to ignore the instruction.


@edit_type(
    "color_grade",
    "filter",
    "Apply a photo filter: black and white, sepia...",
    by_cues=True,
    why="A global color transform (black and white, sepia) any image model can show.",
)
def _color_grade(ctx: EditContext, wording: EditWording) -> Edit | None:
    cue = _other_cue(ctx, ctx.catalog.filters, ctx.slots["filter"])
    return None if cue is None else _cue_edit(ctx, "filter", cue)


@edit_type(
    "art_style",
    "medium",
    "Turn the photo into an artwork: watercolor, sketch, oil painting, 3D render...",
    placeholders=("a_new",),
    why=(
        "A whole-image style (watercolor, sketch) that keeps the composition: what "
        "Prompt-to-Prompt does best."
    ),
)
def _art_style(ctx: EditContext, wording: EditWording) -> Edit | None:
    new = ctx.pick("medium", ctx.catalog.mediums)
    if new is None:
        return None
    return ctx.edit({"medium": new}, wording, a_new=with_article(new))


def _prepare_medium(ctx: EditContext) -> None:
    if not ctx.slots["medium"]:
        ctx.slots["medium"] = ctx.choice(ctx.catalog.mediums)


@edit_type(
    "photo_realism",
    "medium",
    "Turn an artwork back into a realistic photo.",
    prepare=_prepare_medium,
    placeholders=("old", "a_old"),
    why="The reverse: an artwork becomes a photo with the same composition.",
)
def _photo_realism(ctx: EditContext, wording: EditWording) -> Edit | None:
    old = ctx.slots["medium"]
    if not old:
        return None
    return ctx.edit({"medium": ""}, wording, old=old, a_old=with_article(old))


EDIT_TYPES: tuple[EditType, ...] = tuple(_REGISTRY.values())
EDIT_TYPE_NAMES: tuple[str, ...] = tuple(edit.name for edit in EDIT_TYPES)
# The edit types a run uses unless it names its own.
DEFAULT_EDIT_TYPES: tuple[str, ...] = tuple(e.name for e in EDIT_TYPES if e.default_enabled)


def resolve_edit_types(names: Collection[str] | None = None) -> tuple[EditType, ...]:
    """The edit types of these names, in registry order (None: the default set, which
    leaves out the opt-in ones such as ``text_print``). Unknown names raise ValueError."""
    if isinstance(names, str):
        raise ValueError("edit_types must be a collection of names, not one string")
    wanted = DEFAULT_EDIT_TYPES if names is None else tuple(names)
    unknown = sorted(set(wanted) - set(EDIT_TYPE_NAMES))
    if unknown:
        raise ValueError(f"unknown edit types {unknown}; known: {', '.join(EDIT_TYPE_NAMES)}")
    if not wanted:
        raise ValueError("edit_types must name at least one edit type")
    return tuple(edit for edit in EDIT_TYPES if edit.name in wanted)
