"""What makes a caption's slots agree with themselves.

One place decides it, and both the input sampler and the edit types ask it, so a
caption and its edited twin follow the same rules:

* the scene: surface, place and background share a setting (no marble countertop
  against a mountain range), lighting fits it (no warm indoor light on a ski slope),
  and sky phrases (weather, season, time of day) appear only outdoors;
* the product: at most ``max_attributes`` words in front of the noun (Stable
  Diffusion binds two or three, not five), no color word on a material that is its
  own color ("a black 18k gold anklet"), no pair of values that contradict each
  other ("brand-new vintage");
* the words: no two slots say the same word ("a basketball on a basketball court",
  "in a bright playroom, in bright even light"), by the audit's own notion of a word.

The synthesizer keeps only rows whose input and output both pass ``coherent``; the
edit types use ``fitting`` to draw only values that keep the scene coherent, so a
rejection is rare rather than the way values are found.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .captions import ADJECTIVE_SLOTS, SLOT_NAMES
from .catalog import Catalog, Category
from .catalog_schema import Setting, compatible, scene_setting
from .lexicon import close_repeat, content_stems

__all__ = [
    "DEFAULT_MAX_ATTRIBUTES",
    "SCENE_SLOTS",
    "SKY_SLOTS",
    "attributes_ok",
    "coherent",
    "fitting",
    "lighting_fits",
    "scene_ok",
    "setting_of_scene",
    "words_apart",
]

# Attribute words in front of the noun, as in the paper's captions ("black hoodie",
# "a red leather handbag").
DEFAULT_MAX_ATTRIBUTES = 2
# The slots that say where the product is.
SCENE_SLOTS = ("surface", "place", "background")
# Slots that only exist under an open sky.
SKY_SLOTS = ("weather", "season")


def setting_of_scene(category: Category, slots: Mapping[str, str]) -> Setting | None:
    """The setting the scene's surface, place and background agree on; None if they don't."""
    settings = category.settings
    return scene_setting(tuple(settings[value] for s in SCENE_SLOTS if (value := slots[s])))


def lighting_fits(catalog: Catalog, lighting: str, setting: Setting) -> bool:
    """Whether a lighting-slot phrase can light a scene of ``setting``.

    A time of day ("at sunset") is a sky phrase: it needs an outdoor scene, not merely
    one that could be outdoors.
    """
    needs = catalog.lighting_settings[lighting]
    if needs is Setting.OUTDOOR:
        return setting is Setting.OUTDOOR
    return compatible(needs, setting)


def scene_ok(catalog: Catalog, category: Category, slots: Mapping[str, str]) -> bool:
    setting = setting_of_scene(category, slots)
    if setting is None:
        return False
    if (lighting := slots["lighting"]) and not lighting_fits(catalog, lighting, setting):
        return False
    return setting is Setting.OUTDOOR or not any(slots[s] for s in SKY_SLOTS)


def attributes_ok(catalog: Catalog, slots: Mapping[str, str], max_attributes: int) -> bool:
    values = [value for slot in ADJECTIVE_SLOTS if (value := slots[slot])]
    if len(values) > max_attributes:
        return False
    if slots["color"] and slots["material"] in catalog.self_colored_materials:
        return False
    if len(values) > 1 and catalog.exclusive_values:
        present = set(values)
        return not any(pair <= present for pair in catalog.exclusive_values)
    return True


# Every slot whose words could repeat another's ("unit" is "pair"/"set" glue).
_WORDED_SLOTS = tuple(slot for slot in SLOT_NAMES if slot != "unit")


def words_apart(slots: Mapping[str, str]) -> bool:
    """Whether no two slots share a content word (by stem), and the one composed
    phrase, the graphic ("a paw print printed on it"), repeats none within itself."""
    seen: set[str] = set()
    for slot in _WORDED_SLOTS:
        if value := slots[slot]:
            stems = content_stems(value)
            if not seen.isdisjoint(stems):
                return False
            seen |= stems
    graphic = slots["graphic"]
    return not (graphic and close_repeat(graphic))


def coherent(
    catalog: Catalog,
    category: Category,
    slots: Mapping[str, str],
    max_attributes: int = DEFAULT_MAX_ATTRIBUTES,
) -> bool:
    """Whether a caption with these slots describes a photo that can exist."""
    return (
        attributes_ok(catalog, slots, max_attributes)
        and scene_ok(catalog, category, slots)
        and words_apart(slots)
    )


def fitting(
    catalog: Catalog,
    category: Category,
    slots: Mapping[str, str],
    slot: str,
    values: Iterable[str],
    **also: str,
) -> tuple[str, ...]:
    """The ``values`` that keep the scene coherent when ``slot`` takes them (and the
    slots in ``also`` take theirs, as the edit that sets ``slot`` does)."""
    trial = {**slots, **also}
    kept = []
    for value in values:
        trial[slot] = value
        if scene_ok(catalog, category, trial):
            kept.append(value)
    return tuple(kept)
