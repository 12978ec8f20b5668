"""Picking slot values that read well together.

Values are drawn per slot from the catalog, so without a guard a draw can
repeat a word another slot already says: "a copper copper kettle", "a white
white gold ring", "pearl white pearl earrings". The guard is lexical: a value
is refused when it shares a word with the other words in front of the noun
(or, for the object placed next to the product, with the product itself).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Mapping, Sequence

from .captions import ADJECTIVE_SLOTS

__all__ = ["free_choice", "words_of"]

_WORD_SEPARATORS = re.compile(r"[\s\-]+")
# Which slots' words a value of a given slot must not repeat.
_NEIGHBORS = {
    slot: tuple(s for s in (*ADJECTIVE_SLOTS, "product") if s != slot) for slot in ADJECTIVE_SLOTS
}
_NEIGHBORS["companion"] = ("product",)
_EMPTY: frozenset[str] = frozenset()
# Random tries before falling back to filtering the whole list; most draws
# succeed on the first try, so this keeps the common case cheap.
_QUICK_TRIES = 4


@functools.cache
def words_of(value: str) -> frozenset[str]:
    return frozenset(_WORD_SEPARATORS.split(value.lower())) - {""}


def free_choice(
    rng: random.Random, values: Sequence[str], slots: Mapping[str, str], slot: str
) -> str | None:
    """A random value for ``slot`` that differs from its current value and
    repeats no word of the neighboring slots; None when there is none."""
    if not values:
        return None
    current = slots[slot]
    taken = _EMPTY.union(
        *[words_of(other) for s in _NEIGHBORS.get(slot, ()) if (other := slots[s])]
    )
    # Called several times per row: index with random() rather than choice().
    chance = rng.random
    for _ in range(_QUICK_TRIES):
        value = values[int(chance() * len(values))]
        if value != current and taken.isdisjoint(words_of(value)):
            return value
    fitting = [v for v in values if v != current and taken.isdisjoint(words_of(v))]
    return fitting[int(chance() * len(fitting))] if fitting else None
