"""Data audit of caption rows: ``python -m services.datagen audit rows.jsonl``.

Each rule is a small named function that finds the rows breaking it; ``RULES``
lists them (add a rule by writing a function and appending it there).
``audit_rows`` runs every rule over rows (dicts with at least
``input_caption``, ``instruction`` and ``output_caption``; ``TextRow`` objects
are accepted too) and returns an :class:`AuditReport`.

The rules are heuristics over plain text (word lists, not a parser), tuned to
be conservative: a reported row is worth a look, an unreported one is not
proven clean.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.datagen.text.catalog_schema import ATTRIBUTE_SLOTS
from services.datagen.text.lexicon import close_repeat

__all__ = [
    "RULES",
    "TEXT_FIELDS",
    "AuditInputError",
    "AuditReport",
    "Example",
    "Rule",
    "RuleResult",
    "audit_rows",
    "read_rows",
]

TEXT_FIELDS = ("input_caption", "instruction", "output_caption")
CAPTION_FIELDS = ("input_caption", "output_caption")
DEFAULT_EXAMPLES = 3


class AuditInputError(ValueError):
    """The rows file is missing, unreadable or not caption rows."""


@dataclass(frozen=True, slots=True)
class Example:
    """One offending row: its 0-based position, the field and text at fault."""

    row: int
    field: str
    text: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RuleResult:
    name: str
    description: str
    # Rows breaking the rule (a row counts once however often it breaks it).
    count: int
    examples: tuple[Example, ...]


@dataclass(frozen=True, slots=True)
class AuditReport:
    rows: int
    results: tuple[RuleResult, ...]

    @property
    def clean(self) -> bool:
        return all(result.count == 0 for result in self.results)

    def counts(self) -> dict[str, int]:
        return {result.name: result.count for result in self.results}

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "clean": self.clean,
            "rules": [
                {
                    "name": result.name,
                    "description": result.description,
                    "count": result.count,
                    "examples": [
                        {"row": ex.row, "field": ex.field, "text": ex.text, "detail": ex.detail}
                        for ex in result.examples
                    ],
                }
                for result in self.results
            ],
        }

    def format_table(self) -> str:
        """A plain-text report: a summary table, then examples per broken rule."""
        width = max([len("rule"), *(len(result.name) for result in self.results)])
        lines = [f"audited {self.rows} rows", "", f"{'rule':<{width}}  {'rows':>6}  description"]
        lines.append(f"{'-' * width}  {'-' * 6}  {'-' * 11}")
        for result in self.results:
            lines.append(f"{result.name:<{width}}  {result.count:>6}  {result.description}")
        for result in self.results:
            if not result.count:
                continue
            lines += ["", f"{result.name}: {result.count} row(s)"]
            for ex in result.examples:
                detail = f"  ({ex.detail})" if ex.detail else ""
                lines.append(f"  row {ex.row} [{ex.field}]: {ex.text!r}{detail}")
        lines += ["", "clean" if self.clean else "rules broken"]
        return "\n".join(lines)


# A finding: (row position, field, offending text, detail).
Finding = tuple[int, str, str, str]
RuleCheck = Callable[[Sequence[dict[str, Any]]], Iterator[Finding]]


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    check: RuleCheck
    description: str = field(default="")


def _rule(check: RuleCheck) -> Rule:
    doc = (check.__doc__ or "").strip()
    return Rule(check.__name__, check, doc.split("\n\n")[0].replace("\n", " ").strip())


def _per_row(
    func: Callable[[dict[str, Any]], Iterable[tuple[str, str, str]]],
) -> RuleCheck:
    """Lift a row -> (field, text, detail) findings function to a rule check."""

    @functools.wraps(func)
    def check(rows: Sequence[dict[str, Any]]) -> Iterator[Finding]:
        for position, row in enumerate(rows):
            for fld, text, detail in func(row):
                yield position, fld, text, detail

    return check


def _terms_pattern(terms: Iterable[str]) -> re.Pattern[str]:
    # Longest first, so "living room" wins over "room"; word boundaries both sides
    # and no hyphen glued on ("gold-tone" is not "gold").
    alternatives = sorted({term.lower() for term in terms}, key=len, reverse=True)
    body = "|".join(re.escape(term) for term in alternatives)
    return re.compile(rf"(?<![\w-])(?:{body})(?![\w-])")


def _found(pattern: re.Pattern[str], text: str) -> list[str]:
    return pattern.findall(text.lower())


# --- setting_contradiction -------------------------------------------------

WEATHER_TERMS = (
    "rain", "rainy", "raining", "rainfall", "snow", "snowy", "snowfall", "snowing",
    "wind", "windy", "breeze", "fog", "foggy", "mist", "misty", "storm", "stormy",
    "thunderstorm", "hail", "drizzle", "autumn", "autumn leaves", "fall leaves",
    "falling leaves", "fall foliage", "winter", "sunset", "sunrise", "dusk", "dawn",
    "night", "golden hour", "blue hour",
)  # fmt: skip
INDOOR_TERMS = (
    "kitchen", "bathroom", "bedroom", "living room", "office", "desk", "countertop",
    "vanity", "shelf", "bookshelf", "gym mat", "playroom", "playroom rug", "windowsill",
    "nightstand", "tabletop", "dresser", "closet", "hallway", "studio", "dining table",
    "coffee table", "sofa", "couch", "bed", "carpet", "rug", "beach house",
    "boutique", "store", "shop", "showroom", "lobby", "loft",
)  # fmt: skip
INDOOR_LIGHT_TERMS = (
    "indoor light", "indoor lighting", "lamp light", "lamplight", "studio light",
    "studio lighting",
)  # fmt: skip
OUTDOOR_TERMS = (
    "beach", "riverbank", "ski slope", "forest", "park", "mountain", "mountain trail",
    "garden", "street", "sidewalk", "meadow", "lake", "lakeshore", "trail", "campsite",
    "desert", "field", "dock", "porch", "patio", "backyard", "rooftop", "courtyard",
)  # fmt: skip
_WEATHER = _terms_pattern(WEATHER_TERMS)
_INDOOR = _terms_pattern(INDOOR_TERMS)
_INDOOR_LIGHT = _terms_pattern(INDOOR_LIGHT_TERMS)
_OUTDOOR = _terms_pattern(OUTDOOR_TERMS)
_SETTING_SLOTS = ("surface", "place", "background")


@dataclass(frozen=True, slots=True)
class _Vocabulary:
    nouns: frozenset[str]
    # Attribute values (colors, materials, styles...) and pattern adjectives.
    values: frozenset[str]
    # Other words for a product's look or company: logos, pattern names, companions.
    looks: frozenset[str]


@functools.lru_cache(maxsize=1)
def _catalog_vocabulary() -> _Vocabulary | None:
    """The packaged catalog's words; None when it cannot be loaded (the rules that need
    it then find nothing rather than failing the audit)."""
    try:
        from services.datagen.text import load_catalog

        catalog = load_catalog()
    except Exception:
        return None
    nouns: set[str] = set()
    values: set[str] = set(catalog.patterns)
    looks: set[str] = {*catalog.logos, *catalog.patterns.values()}
    for category in catalog.categories:
        looks.update(category.companions)
        for product in category.products:
            nouns.add(product.noun)
            for slot in ATTRIBUTE_SLOTS:
                values.update(product.values.get(slot, ()))
    return _Vocabulary(frozenset(nouns), frozenset(values), frozenset(looks))


@functools.lru_cache(maxsize=1)
def _product_words() -> re.Pattern[str] | None:
    """Catalog phrases that name a product or its look but contain a scene word
    ("rain boots", "snow white", "a retro sunset graphic", "table lamp"): masked before
    the scene words are looked for, so they are not read as weather, a room or a light
    ("recolor the table lamp light gray" says no "lamp light")."""
    vocabulary = _catalog_vocabulary()
    if vocabulary is None:
        return None
    light_words = {word for term in INDOOR_LIGHT_TERMS for word in term.split()}
    scene = _terms_pattern((*WEATHER_TERMS, *INDOOR_TERMS, *OUTDOOR_TERMS, *light_words))
    terms = vocabulary.nouns | vocabulary.values | vocabulary.looks
    with_scene_words = [term for term in terms if scene.search(term.lower())]
    return _terms_pattern(with_scene_words) if with_scene_words else None


def _masked(text: str) -> str:
    pattern = _product_words()
    return pattern.sub(" ", text.lower()) if pattern is not None else text.lower()


def _setting_text(row: dict[str, Any]) -> str:
    """Where the product is: the place slots when the row has them, else its captions."""
    slots = row.get("output_slots")
    if isinstance(slots, dict) and any(slots.get(key) for key in _SETTING_SLOTS):
        return " ".join(str(slots.get(key) or "") for key in _SETTING_SLOTS)
    if isinstance(slots, dict) and all(key in slots for key in _SETTING_SLOTS):
        return ""  # The row says it has no place at all.
    return f"{row['input_caption']} {row['output_caption']}"


def _added_terms(pattern: re.Pattern[str], row: dict[str, Any]) -> list[str]:
    """Terms the edit brings: in the instruction, or new in the output caption.

    Terms already in the input caption are most likely part of the product
    ("snow boots", "desk lamp"), so they are not counted as brought by the edit.
    """
    before = set(_found(pattern, _masked(row["input_caption"])))
    added = _found(pattern, _masked(row["instruction"]))
    output = _found(pattern, _masked(row["output_caption"]))
    added += [term for term in output if term not in before]
    return list(dict.fromkeys(added))


@_per_row
def setting_contradiction(row: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """Weather, season or time of day indoors, or indoor lighting outdoors.

    "make it rain" on a kitchen countertop asks the image model for an
    impossible scene: the edited image either ignores the instruction or
    breaks the scene, and the pair teaches the editor to do the same.
    """
    setting = _masked(_setting_text(row))
    indoor = _found(_INDOOR, setting)
    weather = _added_terms(_WEATHER, row)
    if indoor and weather:
        fld = "instruction" if _found(_WEATHER, row["instruction"]) else "output_caption"
        yield fld, row[fld], f"{weather[0]!r} indoors ({indoor[0]!r})"
        return
    # "a beach house" is indoors: room words are taken out before outdoor words are sought.
    outdoor = _found(_OUTDOOR, _INDOOR.sub(" ", setting))
    lights = _added_terms(_INDOOR_LIGHT, row) or _found(
        _INDOOR_LIGHT, _masked(row["output_caption"])
    )
    if outdoor and lights:
        yield "output_caption", row["output_caption"], f"{lights[0]!r} outdoors ({outdoor[0]!r})"


# --- duplicated_words --------------------------------------------------------


@_per_row
def duplicated_words(row: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """A word repeated back to back, or a word stem repeated within three words.

    "a textured texture" or "against the wall against the wall" are template
    glitches; a text encoder learns them as if they were real phrasing.
    """
    for fld in TEXT_FIELDS:
        if hit := close_repeat(row[fld]):
            yield fld, row[fld], hit


# --- stacked_adjectives -------------------------------------------------------

_MAX_MODIFIERS = 2


@functools.lru_cache(maxsize=1)
def _modifier_patterns() -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
    """(attribute value pattern, product noun pattern) from the packaged catalog."""
    vocabulary = _catalog_vocabulary()
    if vocabulary is None:
        return None, None
    return _terms_pattern(vocabulary.values), _terms_pattern(vocabulary.nouns)


# Where the noun phrase ends when no known product noun is found.
_PHRASE_END = re.compile(r"(?<![\w-])(?:on|in|at|with|against|next|by|under|beside|near)(?![\w-])")
_OF = re.compile(r"(?<![\w-])of(?![\w-])")


@_per_row
def stacked_adjectives(row: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """Three or more attribute modifiers (colour, material, style, finish...) before the noun.

    Long modifier stacks ("a vintage distressed red floral leather bag") read
    unnaturally, crowd out the edit in a 77-token caption, and image models
    honour only some of them, so the caption stops describing the image.
    Counted as catalog attribute values in front of the first product noun
    (after any "an oil painting of" / "a pair of").
    """
    values, nouns = _modifier_patterns()
    if values is None or nouns is None:
        return
    for fld in CAPTION_FIELDS:
        text = row[fld].lower()
        noun = nouns.search(text)
        end = _PHRASE_END.search(text)
        stop = noun.start() if noun else (end.start() if end else len(text))
        start = max((match.end() for match in _OF.finditer(text, 0, stop)), default=0)
        modifiers = values.findall(text[start:stop])
        if len(modifiers) > _MAX_MODIFIERS:
            yield fld, row[fld], f"{len(modifiers)} modifiers: {', '.join(modifiers)}"
            return


# --- impossible_material_colour ---------------------------------------------

# Colours no precious-metal alloy or plating is sold as. White, grey, ivory,
# champagne and yellow are left out (white gold, champagne gold, yellow gold).
NON_METAL_COLOURS = (
    "black", "blue", "green", "red", "pink", "purple", "orange", "brown", "navy", "teal",
    "turquoise", "coral", "burgundy", "maroon", "lavender", "magenta", "olive", "khaki",
    "beige", "mint", "aqua",
)  # fmt: skip
# Named precious metals. Bare "gold" and "silver" are left out: coloured gold
# alloys (green, red, blue, black gold) and oxidised "black silver" exist.
PRECIOUS_METALS = (
    r"\d{1,2}k gold", r"\d{1,2}k white gold", r"\d{1,2}k rose gold", "sterling silver",
    "fine silver", "platinum", "vermeil", "rose gold", "white gold",
)  # fmt: skip
_COLOUR_ON_METAL = re.compile(
    rf"(?<![\w-])({'|'.join(NON_METAL_COLOURS)})\s+({'|'.join(PRECIOUS_METALS)})(?![\w-])"
)


@_per_row
def impossible_material_colour(row: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """A non-metal colour on a precious metal ("a black 18k gold anklet").

    Solid 18k gold, sterling silver or platinum does not come in black or
    blue; the image model draws gold anyway (or a different material), so the
    caption and image disagree. Conservative: only named metals, few colours.
    """
    for fld in CAPTION_FIELDS:
        match = _COLOUR_ON_METAL.search(row[fld].lower())
        if match:
            yield fld, row[fld], match.group()
            return


# --- over_token_limit ---------------------------------------------------------

CLIP_MAX_TOKENS = 77
# 77 minus the start and end tokens.
_TOKEN_BUDGET = CLIP_MAX_TOKENS - 2
_PUNCTUATION = re.compile(r"[^\w\s]")


def estimate_clip_tokens(text: str) -> int:
    """An estimate of CLIP BPE tokens: 1.3 per word plus one per punctuation mark.

    No tokenizer is available offline here; English averages ~1.3 BPE tokens
    per word, so this is an estimate, not an exact count.
    """
    words = len(text.split())
    return math.ceil(words * 1.3 + len(_PUNCTUATION.findall(text)))


@_per_row
def over_token_limit(row: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """Text over CLIP's 77-token context (estimated: words * 1.3 + punctuation > 75).

    CLIP truncates at 77 tokens, so the end of a long caption (often where
    the edit happens: the place, weather, lighting) never reaches the model.
    """
    for fld in TEXT_FIELDS:
        tokens = estimate_clip_tokens(row[fld])
        if tokens > _TOKEN_BUDGET:
            yield fld, row[fld], f"~{tokens} tokens"
            return


# --- near_duplicates ---------------------------------------------------------

_NOT_WORD = re.compile(r"[^\w\s]")


def _normalise(text: str) -> str:
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def near_duplicates(rows: Sequence[dict[str, Any]]) -> Iterator[Finding]:
    """Rows whose (input caption, instruction) match an earlier row's (case, punctuation aside).

    Duplicates waste generation budget, over-weight one edit in training and
    leak between train and test splits.
    """
    first: dict[tuple[str, str], int] = {}
    for position, row in enumerate(rows):
        key = (_normalise(row["input_caption"]), _normalise(row["instruction"]))
        if key in first:
            text = f"{row['input_caption']} | {row['instruction']}"
            yield position, "input_caption+instruction", text, f"same as row {first[key]}"
        else:
            first[key] = position


# Every rule, in report order. Append a Rule to add one.
RULES: list[Rule] = [
    _rule(setting_contradiction),
    _rule(duplicated_words),
    _rule(stacked_adjectives),
    _rule(impossible_material_colour),
    _rule(over_token_limit),
    _rule(near_duplicates),
]


def _as_row(position: int, row: Any) -> dict[str, Any]:
    if hasattr(row, "to_dict"):
        row = row.to_dict()
    if not isinstance(row, dict):
        raise AuditInputError(f"row {position}: expected an object, got {type(row).__name__}")
    for fld in TEXT_FIELDS:
        if not isinstance(row.get(fld), str):
            raise AuditInputError(f"row {position}: missing or non-text {fld!r}")
    return row


def audit_rows(
    rows: Iterable[Any],
    *,
    examples: int = DEFAULT_EXAMPLES,
    rules: Sequence[Rule] | None = None,
) -> AuditReport:
    """Run every rule over ``rows``; keep up to ``examples`` offending rows per rule."""
    table = [_as_row(position, row) for position, row in enumerate(rows)]
    results = []
    for rule in RULES if rules is None else rules:
        offenders: set[int] = set()
        kept: list[Example] = []
        for position, fld, text, detail in rule.check(table):
            if position in offenders:
                continue
            offenders.add(position)
            if len(kept) < examples:
                kept.append(Example(position, fld, text, detail))
        results.append(RuleResult(rule.name, rule.description, len(offenders), tuple(kept)))
    return AuditReport(len(table), tuple(results))


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read JSON Lines caption rows; blank lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditInputError(f"cannot read {path}: {exc}") from exc
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AuditInputError(f"{path}:{number}: not JSON: {exc}") from exc
        rows.append(_as_row(len(rows), row))
    return rows
