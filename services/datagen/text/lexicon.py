"""Words: what counts as the same word twice, for the synthesizer and the audit alike.

"a textured texture", "a bright playroom, in bright even light", "print a paw print
on it": a text encoder learns such glitches as if they were real phrasing. The audit
(``services.datagen.audit``) reports them with ``close_repeat``; the synthesizer avoids
them with the same rule, so a row it writes is one its own audit passes.
"""

from __future__ import annotations

import functools
import re

__all__ = ["STOPWORDS", "close_repeat", "content_stems", "stem", "words"]

_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
# Function words may repeat close together ("a ring on a desk").
STOPWORDS = frozenset(
    (
        "a", "an", "the", "of", "and", "or", "with", "on", "in", "at", "to", "it", "its",
        "it's", "by", "for", "from", "as", "is", "be", "into", "onto", "them", "their",
    )
)  # fmt: skip
_SUFFIXES = ("ings", "ing", "ed", "es", "s", "e", "y")
# How far apart (in words) a repeated stem still reads as a glitch.
STEM_WINDOW = 3
# Stems whose near repeats are ordinary English ("change the lighting to neon light").
_STEM_ALLOWED = frozenset({"light"})


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@functools.cache
def stem(word: str) -> str:
    """A crude stem: "printed" -> "print", "sneakers" -> "sneaker", "sticky" -> "stick"."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)]
    return word


@functools.cache
def content_stems(phrase: str) -> frozenset[str]:
    """The stems of a phrase's content words (function words and allowed repeats left out).
    Hyphenated words count by their parts too ("gold-tone" says "gold")."""
    found = set()
    for word in words(phrase):
        for part in (word, *word.split("-")):
            if part not in STOPWORDS and (s := stem(part)) not in _STEM_ALLOWED:
                found.add(s)
    return frozenset(found)


def close_repeat(text: str) -> str | None:
    """The first repeat in ``text``: a word twice in a row, or a content word's stem
    again within ``STEM_WINDOW`` words; None if there is none."""
    found = words(text)
    for i, word in enumerate(found):
        if i and found[i - 1] == word:
            return f"{word!r} twice in a row"
        if word in STOPWORDS:
            continue
        word_stem = stem(word)
        if word_stem in _STEM_ALLOWED:
            continue
        for j in range(max(0, i - STEM_WINDOW), i):
            other = found[j]
            if other not in STOPWORDS and stem(other) == word_stem:
                return f"{other!r} ... {word!r}"
    return None
