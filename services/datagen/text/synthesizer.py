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

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from .captions import SLOT_NAMES, empty_slots, render_caption
from .catalog import Catalog, Category, Product, load_catalog
from .choices import free_choice
from .edits import EDIT_TYPES, EditContext, EditType, logo_graphic, text_graphic

T = TypeVar("T")

__all__ = ["MAX_ROWS", "SpaceExhaustedError", "TextRow", "sample_input", "synthesize"]

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


def synthesize(rows: int, seed: int, catalog: Catalog | None = None) -> Iterator[TextRow]:
    """Yield ``rows`` unique, balanced rows, reproducibly from ``seed``.

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
    return _generate(rows, seed, catalog if catalog is not None else load_catalog())


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


def _schedules(catalog: Catalog) -> list[_CategorySchedule]:
    schedules = []
    for category in catalog.categories:
        cells = []
        for edit in EDIT_TYPES:
            products = tuple(p for p in category.products if edit.supports(catalog, category, p))
            if products:
                cells.append(_Cell(category, edit, products))
        if cells:
            schedules.append(_CategorySchedule(cells))
    return schedules


def _generate(rows: int, seed: int, catalog: Catalog) -> Iterator[TextRow]:
    rng = random.Random(seed)
    schedules = _schedules(catalog)
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
        row = _draw(rng, catalog, cell, seen, seed)
        if row is None:
            schedule.retire(cell)
            if not schedule.cells:
                schedules.remove(schedule)
            continue
        turn += 1
        yield row


def _draw(
    rng: random.Random, catalog: Catalog, cell: _Cell, seen: set[tuple[str, str]], seed: int
) -> TextRow | None:
    """A new unique row for ``cell``, or None after too many misses in a row."""
    for _ in range(MAX_CONSECUTIVE_MISSES):
        product = cell.products[int(rng.random() * len(cell.products))]
        ctx = EditContext(
            rng, catalog, cell.category, product, sample_input(rng, catalog, cell.category, product)
        )
        cell.edit.prepare(ctx)
        edit = cell.edit.apply(ctx)
        if edit is None:
            continue
        input_slots = ctx.slots
        input_caption = render_caption(input_slots)
        key = (input_caption, edit.instruction)
        if key in seen:
            continue
        output_slots = {**input_slots, **edit.changes}
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
    rng: random.Random, catalog: Catalog, category: Category, product: Product
) -> dict[str, str]:
    """Random input slots for ``product``: attributes, a setting, sometimes extras,
    each as often as the catalog's ``input_odds`` say."""
    odds = catalog.input_odds
    # Hot path (two calls per row): index with random() instead of choice(),
    # which costs several Python-level calls per draw.
    chance = rng.random
    slots = empty_slots()
    slots["product"] = product.noun
    slots["unit"] = product.unit
    for slot in _ATTRIBUTE_DRAW_ORDER:
        values = product.values[slot]
        if values and chance() < odds[slot]:
            slots[slot] = free_choice(rng, values, slots, slot) or ""

    # On a surface (maybe with a backdrop) or somewhere, never both: the two
    # read oddly together ("on sand in a stadium").
    setting = chance()
    if setting < odds["surface"]:
        slots["surface"] = _pick(chance, category.surfaces)
        if chance() < odds["background"]:
            slots["background"] = _pick(chance, category.backgrounds)
    elif setting < odds["surface"] + odds["indoor_place"]:
        slots["place"] = _pick(chance, category.indoor_places)
    else:
        slots["place"] = _pick(chance, category.outdoor_places)

    if chance() < odds["companion"]:
        slots["companion"] = free_choice(rng, category.companions, slots, "companion") or ""
    if chance() < odds["decor"]:
        slots["decor"] = _pick(chance, catalog.decors).phrase
    if category.graphic_methods and chance() < odds["graphic"]:
        ctx = EditContext(rng, catalog, category, product, slots)
        method = _pick(chance, category.graphic_methods)
        if chance() < 0.5:
            slots["graphic"] = logo_graphic(ctx, method, _pick(chance, catalog.logos))
        else:
            slots["graphic"] = text_graphic(ctx, method, _pick(chance, catalog.texts))

    light = chance()
    if light < (threshold := odds["ambient_lighting"]):
        slots["lighting"] = _pick(chance, catalog.ambient_lightings)
    elif light < (threshold := threshold + odds["time_of_day"]):
        slots["lighting"] = _pick(chance, catalog.times_of_day).phrase
    elif light < threshold + odds["lighting"]:
        slots["lighting"] = _pick(chance, catalog.lightings).phrase

    if slots["place"] not in category.indoor_places:
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
