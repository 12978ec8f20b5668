"""Indefinite articles ("a" / "an") chosen by sound, not by spelling.

English picks the article by the first *sound* of the next word, so the
vowel-letter rule alone gets "an hour", "a European-style chair", "a unisex
cap", "an LED lamp" and "an 18k gold ring" wrong. The exceptions below cover
the vocabulary the catalog uses and the usual suspects around it.
"""

from __future__ import annotations

import functools
import re

__all__ = ["indefinite_article", "with_article"]

# Vowel letters that start with a consonant sound ("you", "wun").
_VOWEL_LETTER_BUT_CONSONANT_SOUND = (
    "eu",  # European, eucalyptus
    "ewe",
    "once",
    "use",  # useful, user
    "usu",  # usual
    "uti",  # utility, utilitarian
    "ute",  # utensil
    "uku",  # ukulele
    "ura",  # uranium
    "ure",  # urethane
    "ubiq",  # ubiquitous
    "ufo",
)
# "uni" usually reads "you-ni" (unisex, uniform, unicorn) but "un-" before these.
_UNI_BUT_VOWEL_SOUND = ("unin", "unim", "unid")

# Consonant letters that start with a vowel sound (silent h).
_CONSONANT_LETTER_BUT_VOWEL_SOUND = ("hour", "honest", "honor", "honour", "heir")

# Letter names that start with a vowel sound: "an F", "an LED", "an SUV".
_VOWEL_SOUND_LETTER_NAMES = frozenset("AEFHILMNORSX")

# All-caps words read as words, not spelled out letter by letter.
_ACRONYMS_READ_AS_WORDS = frozenset({"NATO", "NASA", "LEGO", "NASCAR", "SCUBA", "LASER", "OLED"})

_FIRST_TOKEN = re.compile(r"[A-Za-z0-9]+")
_LEADING_DIGITS = re.compile(r"\d+")


def _number_starts_with_vowel_sound(digits: str) -> bool:
    # Read aloud: "an 8", "an 80", "an 11", "an 18", "an 18,000"; but "a 110" ("a hundred ten").
    return digits.startswith("8") or (digits.startswith(("11", "18")) and len(digits) % 3 == 2)


def _starts_with_vowel_sound(word: str) -> bool:
    if word[0].isdigit():
        # "18k", "4K", "3D", "8": only the leading number is read first.
        return _number_starts_with_vowel_sound(_LEADING_DIGITS.match(word).group())
    if word.isupper() and word not in _ACRONYMS_READ_AS_WORDS:
        # Initialisms and single capitals are spelled out: "an LED", "a USB", "an L-shape".
        return word[0] in _VOWEL_SOUND_LETTER_NAMES
    lower = word.lower()
    if lower.startswith(_CONSONANT_LETTER_BUT_VOWEL_SOUND):
        return True
    if lower.startswith("uni"):
        return lower.startswith(_UNI_BUT_VOWEL_SOUND)
    if lower.startswith("one") and not lower.startswith("oner"):
        return False  # one-piece, one-of-a-kind ("only" and "onyx" keep "an")
    if lower.startswith(_VOWEL_LETTER_BUT_CONSONANT_SOUND):
        return False
    return lower[0] in "aeiou"


@functools.lru_cache(maxsize=65536)
def indefinite_article(phrase: str) -> str:
    """Return "a" or "an" for the noun phrase that would follow it."""
    match = _FIRST_TOKEN.search(phrase)
    if match is None:
        raise ValueError(f"no word to choose an article for: {phrase!r}")
    return "an" if _starts_with_vowel_sound(match.group()) else "a"


@functools.lru_cache(maxsize=65536)
def with_article(phrase: str) -> str:
    """Prefix the article: "orange hoodie" -> "an orange hoodie"."""
    return f"{indefinite_article(phrase)} {phrase}"
