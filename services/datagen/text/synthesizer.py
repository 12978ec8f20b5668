"""Rows of (input caption, instruction, output caption) from the catalog.

Generation is a pure function of (rows, seed, catalog): one seeded
``random.Random`` drives every choice and nothing iterates over a set or a
hash-ordered container, so the same seed gives byte-identical output on any
machine.

Balance comes from scheduling, not luck: rows go round-robin over the
categories, and each category cycles through its edit types in a freshly
shuffled order, so a run of N rows holds about N / categories rows per
category and N / (categories x edit types) per pair. Edit first, input
second: the input is sampled for the chosen edit (and ``prepare``d so the
edit applies), so rare preconditions such as "has weather to clear" never
starve an edit type.

Uniqueness is on (input caption, instruction). A (category, edit type) pair
that keeps producing only duplicates is retired; when every pair is retired
before the requested count is reached, the combinatorial space is exhausted
and ``SpaceExhaustedError`` says so instead of looping.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from .captions import ADJECTIVE_SLOTS, SLOT_NAMES, empty_slots, render_caption
from .catalog import Catalog, Category, Product, load_catalog
from .catalog_schema import Setting, compatible
from .choices import free_choice
from .coherence import DEFAULT_MAX_ATTRIBUTES, coherent, lighting_fits, setting_of_scene
from .edits import EditContext, EditType, logo_graphic, resolve_edit_types, text_graphic

T = TypeVar("T")

__all__ = [
    "MAX_ROWS",
    "SpaceExhaustedError",
    "TextRow",
    "sample_input",
    "synthesize",
]

# One run keeps every (caption, instruction) key in memory to stay unique;
# beyond this the caller should split the run over seeds.
MAX_ROWS = 10_000_000
# Consecutive failed draws (duplicates or inapplicable edits) after which a
# (category, edit type) pair counts as exhausted. A pair with a large space
# fails this often only with negligible probability.
MAX_CONSECUTIVE_MISSES = 64

_SLOT_ORDER = {slot: position for position, slot in enumerate(SLOT_NAMES)}
# Attributes are drawn color first: when two values would repeat a word, the
# one listings lead with (color, then material) wins.
_ATTRIBUTE_DRAW_ORDER = ("color", "material", "style", "texture", "pattern", "condition")


class SpaceExhaustedError(ValueError):
    """More unique rows were requested than the catalog can produce."""


@dataclass(frozen=True, slots=True)
class TextRow:
    """One synthesized edit: the paper's three text columns plus provenance."""

    index: int
    seed: int
    category: str
    edit_type: str
    input_caption: str
    instruction: str
    output_caption: str
    # Slots whose value differs between input and output, in slot order.
    changed_slots: tuple[str, ...]
    input_slots: Mapping[str, str]
    output_slots: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with a stable key order."""
        return {
            "index": self.index,
            "seed": self.seed,
            "category": self.category,
            "edit_type": self.edit_type,
            "input_caption": self.input_caption,
            "instruction": self.instruction,
            "output_caption": self.output_caption,
            "changed_slots": list(self.changed_slots),
            "input_slots": dict(self.input_slots),
            "output_slots": dict(self.output_slots),
        }


def synthesize(
    rows: int,
    seed: int,
    catalog: Catalog | None = None,
    *,
    edit_types: Sequence[str] | None = None,
    max_attributes: int = DEFAULT_MAX_ATTRIBUTES,
) -> Iterator[TextRow]:
    """Yield ``rows`` unique, balanced rows, reproducibly from ``seed``.

    ``edit_types``: the names to draw from (None: every edit type enabled by
    default; exact lettering, ``text_print``, only when named). ``max_attributes``:
    the most attribute words (color, material, style...) in front of the noun of
    either caption.

    Arguments are checked now; rows are produced lazily. Raises
    ``SpaceExhaustedError`` (while iterating) if the catalog cannot produce
    that many unique (input caption, instruction) pairs.
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"rows must be a non-negative integer, got {rows!r}")
    if rows > MAX_ROWS:
        raise ValueError(f"rows={rows} is over the {MAX_ROWS} limit of one run; split the run")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if isinstance(max_attributes, bool) or not isinstance(max_attributes, int):
        raise ValueError(f"max_attributes must be an integer, got {max_attributes!r}")
    if not 1 <= max_attributes <= len(ADJECTIVE_SLOTS):
        raise ValueError(
            f"max_attributes must be 1 to {len(ADJECTIVE_SLOTS)}, got {max_attributes}"
        )
    options = _Options(resolve_edit_types(edit_types), max_attributes)
    return _generate(rows, seed, catalog if catalog is not None else load_catalog(), options)


@dataclass(frozen=True, slots=True)
class _Options:
    edit_types: tuple[EditType, ...]
    max_attributes: int

    @property
    def lettering(self) -> bool:
        """Exact text on products only where lettering edits are asked for: Stable
        Diffusion 1.5 cannot spell, so captions that quote text describe images it
        cannot make."""
        return any(edit.name == "text_print" for edit in self.edit_types)


@dataclass(slots=True, eq=False)  # identity: retire() removes this very cell
class _Cell:
    """A (category, edit type) pair and the products that support the edit."""

    category: Category
    edit: EditType
    products: tuple[Product, ...]


class _CategorySchedule:
    """Cycles through one category's live cells in a reshuffled order per cycle."""

    def __init__(self, cells: list[_Cell]) -> None:
        self.cells = cells
        self._order: list[_Cell] = []

    def next_cell(self, rng: random.Random) -> _Cell:
        if not self._order:
            self._order = list(self.cells)
            rng.shuffle(self._order)
        return self._order.pop()

    def retire(self, cell: _Cell) -> None:
        self.cells.remove(cell)
        if cell in self._order:
            self._order.remove(cell)


def _schedules(catalog: Catalog, options: _Options) -> list[_CategorySchedule]:
    schedules = []
    for category in catalog.categories:
        cells = []
        for edit in options.edit_types:
            products = tuple(p for p in category.products if edit.supports(catalog, category, p))
            if products:
                cells.append(_Cell(category, edit, products))
        if cells:
            schedules.append(_CategorySchedule(cells))
    return schedules


def _generate(rows: int, seed: int, catalog: Catalog, options: _Options) -> Iterator[TextRow]:
    rng = random.Random(seed)
    schedules = _schedules(catalog, options)
    seen: set[tuple[str, str]] = set()
    turn = 0
    while len(seen) < rows:
        if not schedules:
            raise SpaceExhaustedError(
                f"the catalog's combinatorial space is exhausted: only {len(seen)} unique "
                f"(input caption, instruction) rows could be made, {rows} were requested"
            )
        schedule = schedules[turn % len(schedules)]
        cell = schedule.next_cell(rng)
        row = _draw(rng, catalog, cell, seen, seed, options)
        if row is None:
            schedule.retire(cell)
            if not schedule.cells:
                schedules.remove(schedule)
            continue
        turn += 1
        yield row


def _draw(
    rng: random.Random,
    catalog: Catalog,
    cell: _Cell,
    seen: set[tuple[str, str]],
    seed: int,
    options: _Options,
) -> TextRow | None:
    """A new unique, coherent row for ``cell``, or None after too many misses in a row."""
    category, limit = cell.category, options.max_attributes
    # Leave room for the attribute the edit adds, so the output stays within the limit.
    reserve = cell.edit.slot if cell.edit.slot in ADJECTIVE_SLOTS else None
    for _ in range(MAX_CONSECUTIVE_MISSES):
        product = cell.products[int(rng.random() * len(cell.products))]
        slots = sample_input(
            rng,
            catalog,
            category,
            product,
            max_attributes=limit,
            reserve=reserve,
            lettering=options.lettering,
        )
        ctx = EditContext(rng, catalog, category, product, slots, options.lettering)
        cell.edit.prepare(ctx)
        edit = cell.edit.apply(ctx)
        if edit is None:
            continue
        input_slots = ctx.slots
        output_slots = {**input_slots, **edit.changes}
        if not (
            coherent(catalog, category, input_slots, limit)
            and coherent(catalog, category, output_slots, limit)
        ):
            continue
        input_caption = render_caption(input_slots)
        key = (input_caption, edit.instruction)
        if key in seen:
            continue
        changed = tuple(
            sorted(
                (s for s, value in edit.changes.items() if value != input_slots[s]),
                key=_SLOT_ORDER.__getitem__,
            )
        )
        if not changed:
            continue
        seen.add(key)
        return TextRow(
            index=len(seen) - 1,
            seed=seed,
            category=cell.category.name,
            edit_type=cell.edit.name,
            input_caption=input_caption,
            instruction=edit.instruction,
            output_caption=render_caption(output_slots),
            changed_slots=changed,
            input_slots=MappingProxyType(input_slots),
            output_slots=MappingProxyType(output_slots),
        )
    return None


def sample_input(
    rng: random.Random,
    catalog: Catalog,
    category: Category,
    product: Product,
    *,
    max_attributes: int = DEFAULT_MAX_ATTRIBUTES,
    reserve: str | None = None,
    lettering: bool = False,
) -> dict[str, str]:
    """Random, coherent input slots for ``product``: attributes, a setting, sometimes
    extras, each as often as the catalog's ``input_odds`` say.

    At most ``max_attributes`` attribute words, one fewer besides ``reserve`` (the
    attribute slot an edit will set), so the edited caption keeps to the limit too.
    The scene's parts are drawn to agree (see ``coherence``). ``lettering``: whether a
    printed graphic may be exact text rather than a logo.
    """
    odds = catalog.input_odds
    # Hot path (two calls per row): index with random() instead of choice(),
    # which costs several Python-level calls per draw.
    chance = rng.random
    slots = empty_slots()
    slots["product"] = product.noun
    slots["unit"] = product.unit
    room = max_attributes - (reserve is not None)
    for slot in _ATTRIBUTE_DRAW_ORDER:
        values = product.values[slot]
        if not values or chance() >= odds[slot]:
            continue
        if slot != reserve:
            if room <= 0:
                continue
            room -= 1
        if slot == "material" and slots["color"]:
            values = _colorable(catalog, values)
        slots[slot] = free_choice(rng, values, slots, slot) or ""

    # On a surface (maybe with a backdrop) or somewhere, never both: the two
    # read oddly together ("on sand in a stadium").
    where = chance()
    if where < odds["surface"]:
        slots["surface"] = surface = _pick(chance, category.surfaces)
        if chance() < odds["background"]:
            slots["background"] = _pick(chance, _backgrounds_with(category, surface))
    elif where < odds["surface"] + odds["indoor_place"]:
        slots["place"] = _pick(chance, category.indoor_places)
    else:
        slots["place"] = _pick(chance, category.outdoor_places)
    setting = setting_of_scene(category, slots) or Setting.EITHER

    if chance() < odds["companion"]:
        slots["companion"] = free_choice(rng, category.companions, slots, "companion") or ""
    if chance() < odds["decor"]:
        slots["decor"] = _pick(chance, catalog.decors).phrase
    if category.graphic_methods and chance() < odds["graphic"]:
        ctx = EditContext(rng, catalog, category, product, slots)
        method = _pick(chance, category.graphic_methods)
        if not lettering or chance() < 0.5:
            slots["graphic"] = logo_graphic(ctx, method, _pick(chance, catalog.logos))
        else:
            slots["graphic"] = text_graphic(ctx, method, _pick(chance, catalog.texts))

    light = chance()
    if light < (threshold := odds["ambient_lighting"]):
        lights = _lightings_for(catalog, "ambient_lightings", setting)
    elif light < (threshold := threshold + odds["time_of_day"]):
        lights = _lightings_for(catalog, "times_of_day", setting)
    elif light < threshold + odds["lighting"]:
        lights = _lightings_for(catalog, "lightings", setting)
    else:
        lights = ()
    if lights:
        slots["lighting"] = _pick(chance, lights)

    if setting is Setting.OUTDOOR:
        sky = chance()
        if sky < odds["weather"]:
            slots["weather"] = _pick(chance, catalog.weather).phrase
        elif sky < odds["weather"] + odds["season"]:
            slots["season"] = _pick(chance, catalog.seasons).phrase
    if chance() < odds["view"]:
        slots["view"] = _pick(chance, catalog.views).phrase
    if chance() < odds["filter"]:
        slots["filter"] = _pick(chance, catalog.filters).phrase
    if chance() < odds["medium"]:
        slots["medium"] = _pick(chance, catalog.mediums)
    return slots


def _pick(chance: Callable[[], float], values: Sequence[T]) -> T:
    return values[int(chance() * len(values))]


@functools.cache
def _colorable(catalog: Catalog, materials: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(m for m in materials if m not in catalog.self_colored_materials)


@functools.cache
def _backgrounds_with(category: Category, surface: str) -> tuple[str, ...]:
    """The backgrounds that can stand behind ``surface`` (a countertop: no mountain range)."""
    where = category.settings[surface]
    return tuple(b for b in category.backgrounds if compatible(category.settings[b], where))


@functools.cache
def _lightings_for(catalog: Catalog, kind: str, setting: Setting) -> tuple[str, ...]:
    """The phrases of one kind of lighting that fit a scene of ``setting``."""
    return tuple(
        cue.phrase for cue in getattr(catalog, kind) if lighting_fits(catalog, cue.phrase, setting)
    )
