"""Slots -> caption.

A caption is a pure function of its slots, and every slot renders into its
own contiguous piece of text whose wording depends on that slot alone. That
locality is what lets an edit change a slot and promise that the output
caption differs from the input caption only in that slot's phrase (plus the
article in front of the noun phrase, which follows the first word's sound).

    a watercolor painting of | an | orange | striped | cotton | hoodie
    | with a skull logo printed on it | next to a straw hat | on a wooden table
    | against a white brick wall | , in falling snow | , at golden hour | ...
"""

from __future__ import annotations

from collections.abc import Mapping

from .articles import indefinite_article, with_article

__all__ = [
    "ADJECTIVE_SLOTS",
    "ARTICLE",
    "NOUN_PHRASE_SLOTS",
    "SCENE_SLOTS",
    "SLOT_NAMES",
    "caption_segments",
    "empty_slots",
    "render_caption",
]

# Words before the noun, in English adjective order (age/opinion, texture,
# color, pattern, material): "a worn vintage quilted red plaid wool jacket".
ADJECTIVE_SLOTS = ("condition", "style", "texture", "color", "pattern", "material")
NOUN_PHRASE_SLOTS = ("unit", *ADJECTIVE_SLOTS, "product")
# Phrases after the noun, joined with a space and a fixed glue word.
_TRAILING_GLUE = (
    ("graphic", " with "),
    ("companion", " next to "),
    ("decor", " "),
    ("surface", " "),
    ("place", " "),
    ("background", " against "),
)
# Phrases that describe the whole picture, appended after a comma.
_CLAUSE_SLOTS = ("weather", "season", "lighting", "view", "filter")
SCENE_SLOTS = tuple(slot for slot, _ in _TRAILING_GLUE) + _CLAUSE_SLOTS

SLOT_NAMES = ("medium", *NOUN_PHRASE_SLOTS, *SCENE_SLOTS)
# Segment key of the "a "/"an " in front of the noun phrase; not a slot.
ARTICLE = "article"


def empty_slots() -> dict[str, str]:
    return dict.fromkeys(SLOT_NAMES, "")


def caption_segments(slots: Mapping[str, str]) -> list[tuple[str, str]]:
    """The caption as (slot name, text) pieces; joining the texts gives the caption.

    Empty slots contribute nothing. The glue around a slot ("with", "next to",
    ", ") belongs to that slot's piece, so an empty slot leaves no trace.
    """
    if not slots["product"]:
        raise ValueError("a caption needs a product")
    segments = []
    if medium := slots["medium"]:
        segments.append(("medium", f"{with_article(medium)} of "))

    unit = slots["unit"]
    first_word_slot = "unit" if unit else next(s for s in NOUN_PHRASE_SLOTS[1:] if slots[s])
    segments.append((ARTICLE, indefinite_article(slots[first_word_slot]) + " "))
    if unit:
        segments.append(("unit", f"{unit} of "))
    segments.extend((slot, slots[slot] + " ") for slot in ADJECTIVE_SLOTS if slots[slot])
    segments.append(("product", slots["product"]))

    for slot, glue in _TRAILING_GLUE:
        if value := slots[slot]:
            if slot == "companion":
                value = with_article(value)
            segments.append((slot, glue + value))
    segments.extend((slot, ", " + slots[slot]) for slot in _CLAUSE_SLOTS if slots[slot])
    return segments


def render_caption(slots: Mapping[str, str]) -> str:
    """The caption text; equal to joining ``caption_segments`` (tested), but
    written straight out because the synthesizer renders two per row."""
    product = slots["product"]
    if not product:
        raise ValueError("a caption needs a product")
    words = [slots[slot] for slot in ADJECTIVE_SLOTS if slots[slot]]
    words.append(product)
    unit = slots["unit"]
    if unit:
        words.insert(0, f"{unit} of")
    # The article depends on the first word only; asking for that word keeps
    # the article cache small and hot.
    parts = [f"{with_article(medium)} of " if (medium := slots["medium"]) else ""]
    parts.append(indefinite_article(words[0]))
    parts.append(" ")
    parts.append(" ".join(words))
    for slot, glue in _TRAILING_GLUE:
        if value := slots[slot]:
            parts.append(glue + (with_article(value) if slot == "companion" else value))
    for slot in _CLAUSE_SLOTS:
        if value := slots[slot]:
            parts.append(", " + value)
    return "".join(parts)
