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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

from .articles import with_article
from .catalog import Catalog, Category, Cue, EditWording, Product
from .choices import free_choice

__all__ = ["BRAND_NEW", "EDIT_TYPES", "Edit", "EditContext", "EditType", "edit_type"]

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

    def edit(self, changes: Mapping[str, str], wording: EditWording, **words: str) -> Edit:
        """Word the edit with one of the templates ``wording`` has for ``words``.

        Templates that mention the old value ("{old}") only fit when there
        was one, so they are skipped when the slot was empty.
        """
        templates = wording.templates(words)
        if not words.get("old"):
            templates = _without_old_value(templates)
        template = self.choice(templates)
        return Edit(dict(changes), template.format_map(self.words() | words))

    def noun_phrase(self, adjective: str) -> str:
        """ "leather" -> "a leather handbag" / "leather sneakers"."""
        phrase = f"{adjective} {self.product.noun}"
        return phrase if self.plural else with_article(phrase)

    def indoors(self) -> bool:
        return self.slots["place"] in self.category.indoor_places

    def move_outdoors(self) -> None:
        """Weather and seasons only make sense outside: swap an indoor place for a surface."""
        if self.indoors():
            self.slots["place"] = ""
            self.slots["surface"] = self.choice(self.category.surfaces)


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
    # Worded by the instructions of the values it sets (weather, camera
    # views... in common.yaml), so it has no entry in edits.yaml.
    by_cues: bool

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


def _cue_edit(ctx: EditContext, slot: str, cue: Cue, **clear: str) -> Edit:
    template = ctx.choice(cue.instructions)
    return Edit({slot: cue.phrase, **clear}, template.format_map(ctx.words()))


# --- product attributes ----------------------------------------------------


@edit_type(
    "color_change",
    "color",
    "Recolor the product.",
    supports=_needs_values("color", 2),
    placeholders=("old", "new", "a_new"),
)
def _color_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    old, new = ctx.slots["color"], ctx.pick("color", ctx.product.values["color"])
    if new is None:
        return None
    return ctx.edit({"color": new}, wording, old=old, new=new, a_new=with_article(new))


def _prepare_shadeable_color(ctx: EditContext) -> None:
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
)
def _material_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    old, new = ctx.slots["material"], ctx.pick("material", ctx.product.values["material"])
    if new is None:
        return None
    return ctx.edit({"material": new}, wording, old=old, new=new, new_product=ctx.noun_phrase(new))


@edit_type(
    "texture_change",
    "texture",
    "Change the surface finish or texture.",
    supports=_needs_values("texture", 2),
    placeholders=("old", "new", "a_new"),
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
    "Put exact lettering on the product.",
    supports=_needs_graphic_methods,
    placeholders=("method", "text", "quoted"),
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
        if ctx.rng.random() < 0.5:
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
)
def _restoration(ctx: EditContext, wording: EditWording) -> Edit | None:
    old = ctx.slots["condition"]
    if old in ("", BRAND_NEW):
        return None
    return ctx.edit({"condition": BRAND_NEW}, wording, old=old)


# --- scene ------------------------------------------------------------------


@edit_type(
    "surface_change", "surface", "Put the product on another surface.", placeholders=("new", "onto")
)
def _surface_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    new = ctx.pick("surface", ctx.category.surfaces)
    if new is None:
        return None
    return ctx.edit(
        # A surface and a place are alternatives ("on sand" vs "in a stadium").
        {"surface": new, "place": ""},
        wording,
        new=new,
        onto="onto " + new.removeprefix("on "),
    )


@edit_type("place_change", "place", "Move the product to another place.", placeholders=("new",))
def _place_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    new = ctx.pick("place", ctx.category.places)
    if new is None:
        return None
    changes = {"place": new, "surface": "", "background": ""}
    if new in ctx.category.indoor_places:
        changes.update(weather="", season="")
    return ctx.edit(changes, wording, new=new)


@edit_type(
    "background_change", "background", "Replace what is behind the product.", placeholders=("new",)
)
def _background_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    new = ctx.pick("background", ctx.category.backgrounds)
    if new is None:
        return None
    return ctx.edit({"background": new, "place": ""}, wording, new=new)


@edit_type(
    "background_removal",
    "background",
    "Cut the product out onto a plain white background.",
    placeholders=("plain",),
)
def _background_removal(ctx: EditContext, wording: EditWording) -> Edit | None:
    plain = ctx.catalog.plain_background
    if ctx.slots["background"] == plain:
        return None
    return ctx.edit(
        # A cut-out keeps the product (and what stands next to it), not the scene.
        {"background": plain, "surface": "", "place": "", "weather": "", "season": "", "decor": ""},
        wording,
        plain=plain,
    )


def _prepare_outdoors(ctx: EditContext) -> None:
    ctx.move_outdoors()


@edit_type(
    "weather_change",
    "weather",
    "Add weather: snow, rain, fog...",
    prepare=_prepare_outdoors,
    by_cues=True,
)
def _weather_change(ctx: EditContext, wording: EditWording) -> Edit | None:
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
)
def _weather_clearing(ctx: EditContext, wording: EditWording) -> Edit | None:
    cue = _cue_named(ctx.catalog.weather, ctx.slots["weather"])
    if cue is None:
        return None
    return ctx.edit({"weather": ""}, wording, weather=cue.name or "weather")


@edit_type(
    "season_change",
    "season",
    "Change the season.",
    prepare=_prepare_outdoors,
    placeholders=("name", "phrase"),
)
def _season_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    cue = _other_cue(ctx, ctx.catalog.seasons, ctx.slots["season"])
    if cue is None:
        return None
    return ctx.edit(
        {"season": cue.phrase, "weather": ""}, wording, name=cue.name, phrase=cue.phrase
    )


@edit_type(
    "time_of_day_change", "lighting", "Change the time of day.", placeholders=("name", "phrase")
)
def _time_of_day_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    cue = _other_cue(ctx, ctx.catalog.times_of_day, ctx.slots["lighting"])
    if cue is None:
        return None
    return ctx.edit({"lighting": cue.phrase}, wording, name=cue.name, phrase=cue.phrase)


@edit_type(
    "lighting_change",
    "lighting",
    "Relight the scene: studio, neon, candlelight...",
    placeholders=("name", "phrase"),
)
def _lighting_change(ctx: EditContext, wording: EditWording) -> Edit | None:
    cue = _other_cue(ctx, ctx.catalog.lightings, ctx.slots["lighting"])
    if cue is None:
        return None
    return ctx.edit({"lighting": cue.phrase}, wording, name=cue.name, phrase=cue.phrase)


def _prepare_no_companion(ctx: EditContext) -> None:
    ctx.slots["companion"] = ""


@edit_type(
    "object_addition",
    "companion",
    "Add an object next to the product.",
    prepare=_prepare_no_companion,
    placeholders=("a_new",),
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
)
def _object_removal(ctx: EditContext, wording: EditWording) -> Edit | None:
    old = ctx.slots["companion"]
    if not old:
        return None
    return ctx.edit({"companion": ""}, wording, old=old)


@edit_type("festive_decor", "decor", "Surround the product with themed decorations.", by_cues=True)
def _festive_decor(ctx: EditContext, wording: EditWording) -> Edit | None:
    cue = _other_cue(ctx, ctx.catalog.decors, ctx.slots["decor"])
    return None if cue is None else _cue_edit(ctx, "decor", cue)


# --- the picture as a whole -------------------------------------------------


@edit_type("camera_view", "view", "Change the camera angle or framing.", by_cues=True)
def _camera_view(ctx: EditContext, wording: EditWording) -> Edit | None:
    cue = _other_cue(ctx, ctx.catalog.views, ctx.slots["view"])
    return None if cue is None else _cue_edit(ctx, "view", cue)


@edit_type("color_grade", "filter", "Apply a photo filter: black and white, sepia...", by_cues=True)
def _color_grade(ctx: EditContext, wording: EditWording) -> Edit | None:
    cue = _other_cue(ctx, ctx.catalog.filters, ctx.slots["filter"])
    return None if cue is None else _cue_edit(ctx, "filter", cue)


@edit_type(
    "art_style",
    "medium",
    "Turn the photo into an artwork: watercolor, sketch, oil painting, 3D render...",
    placeholders=("a_new",),
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
)
def _photo_realism(ctx: EditContext, wording: EditWording) -> Edit | None:
    old = ctx.slots["medium"]
    if not old:
        return None
    return ctx.edit({"medium": ""}, wording, old=old, a_old=with_article(old))


EDIT_TYPES: tuple[EditType, ...] = tuple(_REGISTRY.values())
