"""Bring your own captions: map a user's product descriptions to edit rows.

The paper's synthesizer "accepts a JSON file containing ... input texts and
maps these texts to various edit instructions". This module does that for
captions the catalog did not write:

1. ``read_captions`` reads a file: JSON Lines (each line a JSON string or an
   object ``{"caption", "category"?, "product"?, "attributes"?, "id"?}``) or
   plain text, one caption per line (blank lines and ``#`` lines skipped).
2. ``parse_caption`` finds, in the caption, the product noun the catalog
   knows and the words the catalog knows around it: attribute values before
   the noun ("black", "merino wool"), "a watercolor painting of" in front,
   scene phrases after it ("on a wooden table", "next to a straw hat",
   "against a white brick wall", "with a skull logo printed on it") and cue
   phrases ("in falling snow", "at sunset", "in black and white"), each with
   its character span.
3. ``map_captions`` gives each caption up to ``edits_per_caption`` rows with
   different edit types, chosen reproducibly from the seed. An edit applies
   only when its precondition already holds in what the caption says (the
   edit types' ``prepare`` is never called: it would change the user's
   caption). The output caption is the user's own text with exactly the
   edited words changed; everything else, casing included, stays as written.

Captions that cannot be used are reported (``CaptionProblem``: line, caption,
reason), never silently dropped.

Rules that keep the output honest:

* A phrase is only inserted where the caption leaves no doubt: scene phrases
  (surface, place, background, companion, decoration, logo), lighting and
  weather are not added when the caption has words after the product that
  the catalog does not know ("a hoodie on my desk" might contradict them),
  and medium ("a watercolor painting of") is not put in front of unknown
  words.
* Weather and seasons are only added to a caption that is outdoors (a place
  the catalog lists as outdoor, or weather/season already in the caption).
* No third attribute word is added in front of the noun (the synthesizer's
  ``DEFAULT_MAX_ATTRIBUTES``).
* Each row must pass the data audit (``services.datagen.audit``): an edit
  whose row breaks a rule that the unedited caption does not break is
  skipped and another draw or edit type is tried.

Product nouns: the earliest noun the catalog knows wins (the longest at that
position), skipping nouns inside known scene phrases ("next to a pair of
sunglasses"). A noun in several categories goes to the category whose scene
phrases the caption uses most (then catalog order); ``category`` narrows the
search and ``product`` names the noun outright. A noun the catalog does not
know is reported ("no product noun the catalog knows"), not guessed: the
catalog decides which words fit which product, and a guess would let edits
put impossible values on unknown products.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .articles import indefinite_article, with_article
from .captions import ADJECTIVE_SLOTS, SLOT_NAMES, empty_slots
from .catalog import Catalog, Category, Product, load_catalog
from .catalog_schema import Setting
from .coherence import (
    DEFAULT_MAX_ATTRIBUTES,
    SKY_SLOTS,
    scene_ok,
    setting_of_scene,
    words_apart,
)
from .edits import Edit, EditContext, EditType, resolve_edit_types

__all__ = [
    "DEFAULT_EDITS_PER_CAPTION",
    "CaptionFile",
    "CaptionFileError",
    "CaptionInput",
    "CaptionLine",
    "CaptionMapping",
    "CaptionParseError",
    "CaptionProblem",
    "ParsedCaption",
    "Piece",
    "map_caption_file",
    "map_captions",
    "parse_caption",
    "read_captions",
]

DEFAULT_EDITS_PER_CAPTION = 3
# Draws per edit type for one caption (a draw may pick a value the audit flags).
_DRAWS_PER_EDIT_TYPE = 3
_TRAILING_SLOTS = ("graphic", "companion", "decor", "surface", "place", "background")
_TRAILING_GLUE = {
    "graphic": " with ",
    "companion": " next to ",
    "decor": " ",
    "surface": " ",
    "place": " ",
    "background": " against ",
}
_CLAUSE_SLOTS = ("weather", "season", "lighting", "view", "filter")
_SCENE_SLOTS = (*_TRAILING_SLOTS, *_CLAUSE_SLOTS)
# Slots that are only added when everything after the product is understood.
_NEEDS_KNOWN_SCENE = frozenset({*_TRAILING_SLOTS, "lighting", "weather", "season"})
_SLOT_ORDER = {slot: position for position, slot in enumerate(SLOT_NAMES)}
_WORD = r"[\w-]"
_FINAL_PUNCTUATION = re.compile(r"[.!]+$")
_FIRST_WORD = re.compile(r"[\w'-]+")
_TOKEN = re.compile(r"[\w'-]+|[^\w\s]")
_DETERMINERS = frozenset({"a", "an", "the", "this", "that", "one", "my", "our", "your"})


class CaptionFileError(ValueError):
    """The captions file is missing, unreadable or not text."""


class CaptionInput(BaseModel):
    """One caption to map, as a user sends it (a JSON Lines object or an API item)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)

    caption: str = Field(min_length=1, max_length=1000, description="the product description")
    category: str | None = Field(default=None, description="catalog category name")
    product: str | None = Field(
        default=None, description="the catalog product noun the caption is about"
    )
    attributes: dict[str, str] = Field(
        default_factory=dict,
        description="attribute slot -> value (condition, style, texture, color, pattern, material)",
    )
    id: str | int | None = Field(default=None, description="your id, copied to the rows")


@dataclass(frozen=True, slots=True)
class CaptionProblem:
    """A caption that gave no rows, or a line that is not a caption."""

    line: int  # 1-based line of the file, or position in the list given
    caption: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "caption": self.caption, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class CaptionLine:
    """A caption with the line it came from."""

    line: int
    value: CaptionInput | str | dict[str, Any]


@dataclass(slots=True)
class CaptionFile:
    captions: list[CaptionLine]
    problems: list[CaptionProblem]


@dataclass(slots=True)
class CaptionMapping:
    """What ``map_captions`` made: rows (dicts shaped like ``TextRow.to_dict()``
    plus ``source_line`` and, when given, ``caption_id``) and the problems."""

    rows: list[dict[str, Any]]
    problems: list[CaptionProblem]
    captions: int = 0  # captions looked at (problems from reading a file excluded)
    mapped: int = 0  # captions that gave at least one row


@dataclass(frozen=True, slots=True)
class Piece:
    """Where a slot's words are in the caption.

    ``start:end`` is the whole piece with its glue (" next to a straw hat",
    ", at sunset", "black "): removing the slot removes it. ``value_start:
    value_end`` is what a new value rewrites ("a straw hat", "at sunset",
    "black").
    """

    start: int
    end: int
    value_start: int
    value_end: int


@dataclass(slots=True)
class ParsedCaption:
    """A caption read against the catalog: its slots and where each one is."""

    text: str
    catalog: Catalog
    category: Category
    product: Product
    slots: dict[str, str]
    pieces: dict[str, Piece]
    # Slots whose words cannot be rewritten (said twice, or given only as attributes).
    locked: set[str] = field(default_factory=set)
    # Slots whose words can be replaced but not removed (attributes found elsewhere).
    replace_only: set[str] = field(default_factory=set)
    article: tuple[int, int] | None = None  # "a"/"an" before the noun phrase
    determiner: bool = False  # any article/determiner before the noun phrase
    phrase_start: int = 0  # where the noun phrase's words begin
    noun: tuple[int, int] = (0, 0)
    unknown_before: bool = False  # words before the noun phrase ("Close-up of")
    unknown_in_phrase: bool = False  # unknown words among the adjectives ("handmade")
    unknown_after: bool = False  # words after the noun the catalog does not know
    end: int = 0  # where a phrase appended at the end goes (before a final period)

    @property
    def outdoors(self) -> bool:
        """An outdoor surface, place or background, or a sky phrase the user wrote."""
        setting = setting_of_scene(self.category, self.slots)
        return setting is Setting.OUTDOOR or any(self.slots[slot] for slot in SKY_SLOTS)

    def adjectives_before_noun(self) -> int:
        return sum(
            1
            for slot in ADJECTIVE_SLOTS
            if slot in self.pieces and self.pieces[slot].end <= self.noun[0]
        )


class CaptionParseError(ValueError):
    """Why a caption cannot be mapped; ``map_captions`` reports it as a problem."""


# --- reading -------------------------------------------------------------------


def read_captions(path: str | Path) -> CaptionFile:
    """Read a captions file: JSON Lines or plain text, one caption per line.

    The format is decided once per file: JSON Lines when the first line that
    is not blank or a ``#`` comment parses as a JSON object or string. Lines
    that are broken (bad JSON, not an object or string) are returned as
    problems with their line number. Raises ``CaptionFileError`` when the file
    cannot be read at all.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CaptionFileError(f"{path}: cannot read the captions file: {exc}") from exc
    numbered = [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    captions: list[CaptionLine] = []
    problems: list[CaptionProblem] = []
    if not numbered or not isinstance(_json_or_none(numbered[0][1]), dict | str):
        captions = [CaptionLine(number, line) for number, line in numbered]
        return CaptionFile(captions, problems)
    for number, line in numbered:
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            reason = f"not valid JSON: {exc.msg} at column {exc.colno}"
            problems.append(CaptionProblem(number, _clip(line), reason))
            continue
        if not isinstance(value, dict | str):
            reason = f"expected a JSON object or string, got {type(value).__name__}"
            problems.append(CaptionProblem(number, _clip(line), reason))
            continue
        captions.append(CaptionLine(number, value))
    return CaptionFile(captions, problems)


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- mapping -------------------------------------------------------------------


def map_caption_file(
    path: str | Path,
    *,
    seed: int = 0,
    edits_per_caption: int = DEFAULT_EDITS_PER_CAPTION,
    edit_types: Collection[str] | None = None,
    catalog: Catalog | None = None,
) -> CaptionMapping:
    """``read_captions`` then ``map_captions``; the problems of both, by line."""
    source = read_captions(path)
    mapping = map_captions(
        source.captions,
        seed=seed,
        edits_per_caption=edits_per_caption,
        edit_types=edit_types,
        catalog=catalog,
    )
    mapping.problems = sorted(source.problems + mapping.problems, key=lambda p: p.line)
    return mapping


def map_captions(
    captions: Iterable[CaptionInput | CaptionLine | str | Mapping[str, Any]],
    *,
    seed: int = 0,
    edits_per_caption: int = DEFAULT_EDITS_PER_CAPTION,
    edit_types: Collection[str] | None = None,
    catalog: Catalog | None = None,
) -> CaptionMapping:
    """Map each caption to up to ``edits_per_caption`` rows with different edit types.

    ``captions``: texts, dicts (validated as ``CaptionInput``), ``CaptionInput``
    objects or ``CaptionLine`` (from ``read_captions``). Problems carry the
    ``CaptionLine``'s line, else the 1-based position in ``captions``.
    ``edit_types``: names of the edit types that may be used (default: those
    enabled by default, ``DEFAULT_EDIT_TYPES``; exact lettering only when named).
    The rows of caption *i* depend only on (seed, i, the caption, the catalog), so
    a run is reproducible.

    Raises ``ValueError`` for bad arguments (an unknown edit type name,
    ``edits_per_caption`` < 1); problems with a caption are never raised.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if isinstance(edits_per_caption, bool) or not isinstance(edits_per_caption, int):
        raise ValueError(f"edits_per_caption must be an integer, got {edits_per_caption!r}")
    if edits_per_caption < 1:
        raise ValueError(f"edits_per_caption must be at least 1, got {edits_per_caption}")
    enabled = resolve_edit_types(edit_types)
    catalog = catalog if catalog is not None else load_catalog()

    mapping = CaptionMapping(rows=[], problems=[])
    seen_captions: dict[str, int] = {}
    seen_rows: set[tuple[str, str]] = set()
    for position, item in enumerate(captions):
        line = item.line if isinstance(item, CaptionLine) else position + 1
        value = item.value if isinstance(item, CaptionLine) else item
        mapping.captions += 1
        try:
            request = _as_input(value)
        except CaptionParseError as exc:
            mapping.problems.append(CaptionProblem(line, _describe(value), str(exc)))
            continue
        key = " ".join(request.caption.lower().split())
        if key in seen_captions:
            reason = f"same caption as line {seen_captions[key]}"
            mapping.problems.append(CaptionProblem(line, request.caption, reason))
            continue
        try:
            parsed = parse_caption(request, catalog)
        except CaptionParseError as exc:
            mapping.problems.append(CaptionProblem(line, request.caption, str(exc)))
            continue
        seen_captions[key] = line
        rng = random.Random(f"{seed}:{position}")
        rows = _rows_for(parsed, rng, enabled, edits_per_caption, seen_rows)
        if not rows:
            reason = "no edit type applies to this caption"
            mapping.problems.append(CaptionProblem(line, request.caption, reason))
            continue
        mapping.mapped += 1
        for row in rows:
            row = {"index": len(mapping.rows), "seed": seed, **row, "source_line": line}
            if request.id is not None:
                row["caption_id"] = request.id
            mapping.rows.append(row)
    return mapping


def _as_input(value: Any) -> CaptionInput:
    if isinstance(value, CaptionInput):
        return value
    if isinstance(value, str):
        if not value.strip():
            raise CaptionParseError("empty caption")
        value = {"caption": value}
    if not isinstance(value, Mapping):
        raise CaptionParseError(f"expected a caption text or object, got {type(value).__name__}")
    try:
        return CaptionInput.model_validate(dict(value))
    except ValidationError as exc:
        raise CaptionParseError(
            "; ".join(_validation_reason(error) for error in exc.errors())
        ) from None


def _validation_reason(error: Mapping[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "caption"
    if error["type"] == "extra_forbidden":
        return f"unknown key {where!r} (keys: caption, category, product, attributes, id)"
    return f"{where}: {error['msg']}"


def _describe(value: Any) -> str:
    if isinstance(value, CaptionInput):
        return value.caption
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("caption"), str):
        return value["caption"]
    try:
        return _clip(json.dumps(value, ensure_ascii=False, default=str))
    except (TypeError, ValueError):
        return _clip(repr(value))


# --- parsing -------------------------------------------------------------------


def parse_caption(request: CaptionInput | str, catalog: Catalog | None = None) -> ParsedCaption:
    """Read one caption against the catalog; raises ``CaptionParseError`` (with the
    reason) when it names no product the catalog knows or its fields do not fit."""
    catalog = catalog if catalog is not None else load_catalog()
    if isinstance(request, str):
        request = CaptionInput(caption=request)
    vocabulary = _vocabulary(catalog)
    text = request.caption
    low = _lower(text)

    categories = catalog.categories
    if request.category is not None:
        try:
            categories = (catalog.category(request.category),)
        except KeyError:
            raise CaptionParseError(
                f"unknown category {request.category!r}; known: {', '.join(catalog.category_names)}"
            ) from None

    masked = _mask(low, vocabulary.scene_pattern)
    if request.product is not None:
        wanted = request.product.lower()
        candidates = [
            (category, product)
            for category in categories
            for product in category.products
            if product.noun.lower() == wanted
        ]
        if not candidates:
            where = f" in {request.category}" if request.category else ""
            raise CaptionParseError(f"product {request.product!r} is not a catalog noun{where}")
        span = _find(masked, wanted)
        if span is None:
            raise CaptionParseError(f"product {request.product!r} does not appear in the caption")
    else:
        nouns = frozenset(p.noun.lower() for category in categories for p in category.products)
        span = _first_noun(masked, nouns)
        if span is None:
            raise CaptionParseError(
                "no product noun the catalog knows: give `category` and `product` "
                "(a catalog noun that appears in the caption)"
            )
        wanted = low[span[0] : span[1]]
        candidates = [
            (category, product)
            for category in categories
            for product in category.products
            if product.noun.lower() == wanted
        ]

    best: ParsedCaption | None = None
    for category, product in candidates:
        parsed = _parse_with(text, low, catalog, category, product, span)
        if best is None or len(parsed.pieces) > len(best.pieces):
            best = parsed
    assert best is not None
    _apply_attributes(best, request.attributes, low)
    return best


def _lower(text: str) -> str:
    # Per character, so spans in the lowered text are spans in the caption.
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


@functools.lru_cache(maxsize=8192)
def _bounded(phrase: str) -> re.Pattern[str]:
    """``phrase`` as a whole-words pattern; compiled once (the catalog has thousands of
    phrases, more than ``re``'s own cache keeps)."""
    return re.compile(rf"(?<!{_WORD}){re.escape(phrase.lower())}(?!{_WORD})")


def _find(text: str, phrase: str, start: int = 0) -> tuple[int, int] | None:
    match = _bounded(phrase).search(text, start)
    return match.span() if match else None


def _mask(low: str, pattern: re.Pattern[str]) -> str:
    """Blank out known scene phrases, so a noun inside one is not the product."""
    return pattern.sub(lambda m: " " * len(m.group()), low)


def _first_noun(masked: str, nouns: frozenset[str]) -> tuple[int, int] | None:
    """The earliest noun in the caption; the longest one at that position."""
    match = _noun_pattern(nouns).search(masked)
    return match.span() if match else None


@functools.lru_cache(maxsize=64)
def _noun_pattern(nouns: frozenset[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(n) for n in sorted(nouns, key=lambda n: (-len(n), n)))
    return re.compile(rf"(?<!{_WORD})(?:{alternatives})(?!{_WORD})")


@dataclass(frozen=True, slots=True)
class _Vocabulary:
    scene_pattern: re.Pattern[str]
    # (slot, value) of every attribute value any product has, longest first.
    attribute_values: tuple[tuple[str, str], ...]
    proper_words: frozenset[str]


@functools.lru_cache(maxsize=8)
def _vocabulary(catalog: Catalog) -> _Vocabulary:
    scene: set[str] = set()
    words: set[str] = set()
    values: set[tuple[str, str]] = {("pattern", pattern) for pattern in catalog.patterns}
    for category in catalog.categories:
        scene.update(category.surfaces)
        scene.update(category.places)
        scene.update(f"against {background}" for background in category.backgrounds)
        scene.update(f"next to {with_article(companion)}" for companion in category.companions)
        for product in category.products:
            words.update(product.noun.split())
            for slot in ADJECTIVE_SLOTS:
                for value in product.values[slot]:
                    words.update(value.split())
                    values.add((slot, value))
    words.update(word for medium in _phrases(catalog.mediums) for word in medium.split())
    alternatives = "|".join(re.escape(p.lower()) for p in sorted(scene, key=len, reverse=True))
    return _Vocabulary(
        scene_pattern=re.compile(rf"(?<!{_WORD})(?:{alternatives})(?!{_WORD})"),
        attribute_values=tuple(sorted(values, key=lambda item: (-len(item[1]), item))),
        proper_words=frozenset(word for word in words if word[:1].isupper()),
    )


def _phrases(values: Iterable[Any]) -> tuple[str, ...]:
    """Catalog values as phrases, whether plain strings or cues with ``.phrase``."""
    return tuple(value if isinstance(value, str) else value.phrase for value in values)


def _parse_with(
    text: str,
    low: str,
    catalog: Catalog,
    category: Category,
    product: Product,
    noun: tuple[int, int],
) -> ParsedCaption:
    slots = empty_slots()
    slots["product"] = product.noun
    parsed = ParsedCaption(text, catalog, category, product, slots, {}, noun=noun)
    final = _FINAL_PUNCTUATION.search(text)
    parsed.end = final.start() if final else len(text)

    # In front: "a watercolor painting of".
    medium_end = 0
    for medium in sorted(_phrases(catalog.mediums), key=len, reverse=True):
        match = re.match(rf"(an?) {re.escape(medium.lower())} of ", low)
        if match and match.end() <= noun[0]:
            slots["medium"] = medium
            value_end = match.end() - len(" of ")
            parsed.pieces["medium"] = Piece(0, match.end(), 0, value_end)
            medium_end = match.end()
            break

    # The noun phrase, backwards from the noun: adjectives, "pair of", the article.
    # A value the catalog has for the slot but not for this product ("gray" on
    # a sofa sold in "charcoal") is still read as that slot: an edit may
    # replace or remove it, which leaves a value the product does have.
    allowed = {(slot, value) for slot in ADJECTIVE_SLOTS for value in product.values[slot]}
    position = noun[0]
    while low[position - 1 : position] == " ":
        before = low[medium_end : position - 1]
        best: tuple[str, str] | None = None
        for slot, value in _vocabulary(catalog).attribute_values:
            if (
                slot not in parsed.pieces
                and before.endswith(value.lower())
                and not re.match(_WORD, before[-len(value) - 1 : -len(value)] or " ")
                and (
                    best is None
                    or len(value) > len(best[1])
                    or (len(value) == len(best[1]) and (slot, value) in allowed)
                )
            ):
                best = (slot, value)
        if best is None:
            break
        slot, value = best
        start = position - 1 - len(value)
        slots[slot] = value
        parsed.pieces[slot] = Piece(start, position, start, start + len(value))
        position = start
    if product.unit and low[medium_end:position].endswith(f"{product.unit} of "):
        unit_start = position - len(f"{product.unit} of ")
        if unit_start == 0 or not re.match(_WORD, low[unit_start - 1]):
            slots["unit"] = product.unit
            parsed.pieces["unit"] = Piece(unit_start, position, unit_start, position - 4)
            position = unit_start
    # Words the catalog does not know between the article and the known ones
    # ("a *handmade* black hoodie") belong to the noun phrase; words before the
    # article ("Close-up of a ...") do not.
    tokens = list(_TOKEN.finditer(low, medium_end, position))
    stop = len(tokens)
    while (
        stop
        and re.fullmatch(r"[\w'-]+", tokens[stop - 1].group())
        and (tokens[stop - 1].group() not in _DETERMINERS | {"of"})
    ):
        stop -= 1
    parsed.unknown_in_phrase = stop < len(tokens)
    parsed.phrase_start = tokens[stop].start() if stop < len(tokens) else position
    if stop and tokens[stop - 1].group() in _DETERMINERS:
        parsed.determiner = True
        if tokens[stop - 1].group() in ("a", "an"):
            parsed.article = tokens[stop - 1].span()
        stop -= 1
    parsed.unknown_before = stop > 0

    # After the noun: scene and cue phrases.
    found = _scene_phrases(low, noun[1], catalog, category, product)
    taken: list[tuple[int, int]] = []
    for start, end, slot, value, value_start, value_end in found:
        if any(start < b and a < end for a, b in taken):
            continue
        taken.append((start, end))
        glue = start
        if low[:start].endswith(", "):
            glue = start - 2
        elif low[:start].endswith(" "):
            glue = start - 1
        if slot in parsed.pieces:
            parsed.locked.add(slot)
            continue
        slots[slot] = value if slot != "graphic" else text[value_start:value_end]
        parsed.pieces[slot] = Piece(glue, end, value_start, value_end)
    rest = list(low[noun[1] : parsed.end])
    for a, b in taken:
        rest[a - noun[1] : b - noun[1]] = " " * (b - a)
    leftover = re.sub(r"\b(?:and|with|next to|against)\b", " ", "".join(rest))
    parsed.unknown_after = bool(re.search(r"\w", leftover))
    return parsed


def _scene_phrases(
    low: str, after: int, catalog: Catalog, category: Category, product: Product
) -> list[tuple[int, int, str, str, int, int]]:
    """(start, end, slot, value, value_start, value_end) of the known phrases
    after the noun, longest first."""
    options: list[tuple[str, str, str, int]] = []  # (slot, value, searched text, value offset)
    for phrase in category.surfaces:
        options.append(("surface", phrase, phrase, 0))
    for phrase in category.places:
        options.append(("place", phrase, phrase, 0))
    for background in (*category.backgrounds, catalog.plain_background):
        options.append(("background", background, f"against {background}", len("against ")))
    for companion in category.companions:
        options.append(
            ("companion", companion, f"next to {with_article(companion)}", len("next to "))
        )
    cue_slots = (
        ("decor", catalog.decors),
        ("weather", catalog.weather),
        ("season", catalog.seasons),
        ("lighting", catalog.times_of_day),
        ("lighting", catalog.lightings),
        ("lighting", catalog.ambient_lightings),
        ("view", catalog.views),
        ("filter", catalog.filters),
    )
    for slot, values in cue_slots:
        for phrase in _phrases(values):
            options.append((slot, phrase, phrase, 0))
    found = []
    for slot, value, searched, offset in options:
        for match in _bounded(searched).finditer(low[after:]):
            start, end = match.start() + after, match.end() + after
            found.append((start, end, slot, value, start + offset, end))
    participles = sorted(set(catalog.graphic_methods.values()), key=len, reverse=True)
    if participles:
        graphic = re.compile(
            rf"(?<!{_WORD})with ((?:an? |the )?\S.*? (?:{'|'.join(map(re.escape, participles))})"
            rf" on (?:it|them))(?!{_WORD})"
        )
        for match in graphic.finditer(low, after):
            found.append((match.start(), match.end(), "graphic", "", match.start(1), match.end(1)))
    found.sort(key=lambda item: (-(item[1] - item[0]), item[0]))
    return found


def _apply_attributes(parsed: ParsedCaption, attributes: Mapping[str, str], low: str) -> None:
    for slot, given in attributes.items():
        if slot not in ADJECTIVE_SLOTS:
            raise CaptionParseError(
                f"unknown attribute slot {slot!r}; attributes may be {', '.join(ADJECTIVE_SLOTS)}"
            )
        allowed = parsed.product.values[slot]
        value = next((v for v in allowed if v.lower() == given.strip().lower()), None)
        if value is None:
            shown = ", ".join(allowed[:8]) + (", ..." if len(allowed) > 8 else "")
            raise CaptionParseError(
                f"attributes.{slot}: {given!r} is not a {slot} the catalog allows for "
                f"{parsed.product.noun}" + (f" ({shown})" if allowed else f" (it has no {slot})")
            )
        if parsed.slots[slot] == value:
            continue
        parsed.pieces.pop(slot, None)
        parsed.slots[slot] = value
        spans = [(p.start, p.end) for p in parsed.pieces.values()]
        start = 0
        while (span := _find(low, value, start)) is not None:
            if not any(span[0] < b and a < span[1] for a, b in spans):
                break
            start = span[1]
        if span is None or parsed.noun[0] <= span[0] < parsed.noun[1]:
            parsed.locked.add(slot)  # said by the attributes only: its words are unknown
            continue
        parsed.pieces[slot] = Piece(span[0], span[1], span[0], span[1])
        parsed.replace_only.add(slot)


# --- edits ---------------------------------------------------------------------


def _rows_for(
    parsed: ParsedCaption,
    rng: random.Random,
    enabled: tuple[EditType, ...],
    wanted: int,
    seen: set[tuple[str, str]],
) -> list[dict[str, Any]]:
    order = list(enabled)
    rng.shuffle(order)
    rows: list[dict[str, Any]] = []
    baseline = _audit_failures(parsed.text, "", parsed.text, parsed.slots, parsed.slots)
    for edit_type in order:
        if len(rows) == wanted:
            break
        if not edit_type.supports(parsed.catalog, parsed.category, parsed.product):
            continue
        for _ in range(_DRAWS_PER_EDIT_TYPE):
            slots = dict(parsed.slots)
            ctx = EditContext(rng, parsed.catalog, parsed.category, parsed.product, slots)
            edit = edit_type.apply(ctx)
            if edit is None:
                break
            row = _row(parsed, edit_type, edit, baseline, seen)
            if row is not None:
                rows.append(row)
                break
    return rows


def _row(
    parsed: ParsedCaption,
    edit_type: EditType,
    edit: Edit,
    baseline: frozenset[str],
    seen: set[tuple[str, str]],
) -> dict[str, Any] | None:
    input_slots = parsed.slots
    changes = {slot: value for slot, value in edit.changes.items() if value != input_slots[slot]}
    if not changes:
        return None
    adds_sky = any(changes.get(slot) for slot in SKY_SLOTS)
    if adds_sky and not parsed.outdoors:
        return None
    output = _rewrite(parsed, changes)
    if output is None or output == parsed.text:
        return None
    key = (" ".join(parsed.text.lower().split()), " ".join(edit.instruction.lower().split()))
    if key in seen:
        return None
    output_slots = {**input_slots, **changes}
    # The synthesizer's own scene and word rules: an edit may not break what held.
    for holds in (functools.partial(scene_ok, parsed.catalog, parsed.category), words_apart):
        if holds(input_slots) and not holds(output_slots):
            return None
    if _audit_failures(parsed.text, edit.instruction, output, input_slots, output_slots) - baseline:
        return None
    seen.add(key)
    return {
        "category": parsed.category.name,
        "edit_type": edit_type.name,
        "input_caption": parsed.text,
        "instruction": edit.instruction,
        "output_caption": output,
        "changed_slots": sorted(changes, key=_SLOT_ORDER.__getitem__),
        "input_slots": dict(input_slots),
        "output_slots": output_slots,
    }


def _audit_failures(
    input_caption: str,
    instruction: str,
    output_caption: str,
    input_slots: Mapping[str, str],
    output_slots: Mapping[str, str],
) -> frozenset[str]:
    """The per-row audit rules this row breaks (duplicates are checked apart)."""
    from services.datagen.audit import RULES, audit_rows

    row = {
        "input_caption": input_caption,
        "instruction": instruction,
        "output_caption": output_caption,
        "input_slots": dict(input_slots),
        "output_slots": dict(output_slots),
    }
    rules = [rule for rule in RULES if rule.name != "near_duplicates"]
    report = audit_rows([row], examples=0, rules=rules)
    return frozenset(result.name for result in report.results if result.count)


def _rewrite(parsed: ParsedCaption, changes: Mapping[str, str]) -> str | None:
    """The caption with exactly ``changes`` made; None when the words cannot be
    changed safely (see the module docstring)."""
    text = parsed.text
    ops: list[tuple[int, int, str]] = []
    for slot, new in changes.items():
        if slot in parsed.locked or slot in ("product", "unit"):
            return None
        if slot == "medium":
            continue
        old, piece = parsed.slots[slot], parsed.pieces.get(slot)
        if old and piece is None:
            return None
        if old and new:
            original = text[piece.value_start : piece.value_end]
            rendered = with_article(new) if slot == "companion" else new
            ops.append((piece.value_start, piece.value_end, _same_case(original, rendered)))
        elif old:
            if slot in parsed.replace_only:
                return None
            ops.append((piece.start, piece.end, ""))
        else:
            insertion = _insertion(parsed, slot, new, changes)
            if insertion is None:
                return None
            ops.append(insertion)

    ops.sort(key=lambda op: (op[0], op[1]))
    out, cursor = [], 0
    article_at = None
    for start, end, replacement in ops:
        if start < cursor:
            return None  # two edits on the same words
        out.append(text[cursor:start])
        out.append(replacement)
        cursor = end
    out.append(text[cursor:])
    # Positions before the first op are unchanged: the article precedes every op
    # except the medium's, which is applied below.
    result = "".join(out)
    if parsed.article is not None:
        a, b = parsed.article
        article_at = (a, b)
        following = _FIRST_WORD.search(result, b)
        if following is None:
            return None
        article = _same_case(result[a:b], indefinite_article(following.group()))
        result = result[:a] + article + result[b:]
    if "medium" in changes:
        result = _rewrite_medium(parsed, result, changes["medium"], article_at)
    return result


def _insertion(
    parsed: ParsedCaption, slot: str, value: str, changes: Mapping[str, str]
) -> tuple[int, int, str] | None:
    if slot in ADJECTIVE_SLOTS:
        if parsed.unknown_in_phrase:
            return None  # where it goes among unknown words is anyone's guess
        added = sum(1 for s in ADJECTIVE_SLOTS if changes.get(s) and not parsed.slots[s])
        if parsed.adjectives_before_noun() + added > DEFAULT_MAX_ATTRIBUTES:
            return None
        order = ADJECTIVE_SLOTS.index(slot)
        later = [
            parsed.pieces[s].start
            for s in ADJECTIVE_SLOTS[order + 1 :]
            if s in parsed.pieces and parsed.pieces[s].end <= parsed.noun[0]
        ]
        position = min(later, default=parsed.noun[0])
        return position, position, value + " "
    if slot in _NEEDS_KNOWN_SCENE and parsed.unknown_after:
        return None
    if slot in _SCENE_SLOTS:
        index = _SCENE_SLOTS.index(slot)
        later = [
            parsed.pieces[s].start
            for s in _SCENE_SLOTS[index + 1 :]
            if s in parsed.pieces and parsed.pieces[s].start >= parsed.noun[1]
        ]
        position = min(later, default=parsed.end)
        if slot in _TRAILING_GLUE:
            rendered = with_article(value) if slot == "companion" else value
            return position, position, _TRAILING_GLUE[slot] + rendered
        return position, position, ", " + value
    return None


def _rewrite_medium(
    parsed: ParsedCaption, result: str, new: str, article: tuple[int, int] | None
) -> str | None:
    piece = parsed.pieces.get("medium")
    if piece is not None:
        original = result[piece.value_start : piece.value_end]
        if new:
            return _same_case(original, with_article(new)) + result[piece.value_end :]
        rest = result[piece.end :]
        return _same_case(original, rest) if original[:1].isupper() else rest
    if parsed.unknown_before:
        return None
    rest = result
    if not parsed.determiner and not parsed.slots["unit"] and not parsed.product.unit:
        rest = f"{indefinite_article(rest)} {rest}"
    first = _FIRST_WORD.match(rest)
    if first is not None:
        word = first.group()
        keep = (len(word) > 1 and word.isupper()) or word in _vocabulary(
            parsed.catalog
        ).proper_words
        if not keep:
            rest = rest[:1].lower() + rest[1:]
    prefix = f"{with_article(new)} of "
    if parsed.text[:1].isupper():
        prefix = prefix[:1].upper() + prefix[1:]
    return prefix + rest


def _same_case(original: str, new: str) -> str:
    """``new`` with the first letter upper-cased when ``original``'s was."""
    if original[:1].isupper() and new:
        return new[:1].upper() + new[1:]
    return new
