"""Shared fixtures for the text synthesizer tests.

The repository's top-level conftest only defines fixtures (Redis, tiny model)
that these tests never request, so nothing here needs a service running.
"""

from __future__ import annotations

import pytest
import yaml

from services.datagen.text import TextRow, load_catalog, synthesize
from services.datagen.text.catalog import INPUT_ODDS_KEYS


@pytest.fixture(scope="session")
def catalog():
    return load_catalog()


@pytest.fixture(scope="session")
def rows_3000(catalog) -> list[TextRow]:
    """The paper's automated set size, generated once for all property tests."""
    return list(synthesize(3000, seed=0, catalog=catalog))


def tiny_common() -> dict:
    """The smallest common.yaml the loader accepts: one value per list."""
    return {
        "patterns": {"striped": "stripes"},
        "graphic_methods": {"print": "printed"},
        "logos": ["star logo"],
        "texts": ["HELLO"],
        "weather": [{"phrase": "in the rain", "noun": "rain", "instructions": ["make it rain"]}],
        "seasons": [{"name": "winter", "phrase": "in winter"}],
        "times_of_day": [{"name": "night", "phrase": "at night"}],
        "lightings": [
            {"name": "studio light", "phrase": "under studio lighting", "setting": "studio"}
        ],
        "ambient_lightings": [{"phrase": "in soft daylight"}],
        "mediums": ["pencil sketch"],
        "views": [{"phrase": "seen from above"}],
        "filters": [{"phrase": "in black and white", "instructions": ["make it black and white"]}],
        "decors": [{"phrase": "surrounded by confetti", "instructions": ["add confetti"]}],
        "shadeable_colors": ["red"],
        "plain_background": "a plain white background",
        "backgrounds": {"either": ["a brick wall"]},
        # No optional extras: each product has a single input caption, so
        # the whole space is a few hundred rows.
        "input_odds": {**dict.fromkeys(INPUT_ODDS_KEYS, 0.0), "surface": 1.0},
    }


def tiny_category(name: str = "mugs") -> dict:
    return {
        "name": name,
        "label": "Mugs",
        "graphic_methods": ["print"],
        "defaults": {
            "color": ["red", "blue"],
            "material": ["ceramic", "glass"],
            "texture": [],
            "pattern": ["striped"],
            "style": [],
            "condition": ["chipped"],
        },
        "products": [{"noun": "mug"}, {"noun": "teacups", "unit": "set"}],
        "companions": ["spoon", "saucer"],
        "surfaces": {"indoor": ["on a table"]},
        "places": {"indoor": ["in a kitchen"], "outdoor": ["in a garden"]},
        "backgrounds": {},
    }


def write_catalog(directory, common: dict | None = None, categories: list[dict] | None = None):
    """Write a catalog directory; each category goes to ``<its name>.yaml``
    unless it has a ``file_stem`` key (to test a mismatching name)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "common.yaml").write_text(yaml.safe_dump(common or tiny_common()))
    for category in categories or [tiny_category()]:
        category = dict(category)
        stem = category.pop("file_stem", category.get("name"))
        (directory / f"{stem}.yaml").write_text(yaml.safe_dump(category))
    return directory


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory):
    return load_catalog(write_catalog(tmp_path_factory.mktemp("tiny_catalog")))


# The image-pair stage's fixtures (tiny Stable Diffusion and CLIP models, generators).
from tests.datagen.conftest_images import (  # noqa: E402, F401
    clip_filter,
    ctx,
    pair_generator,
    tiny_clip_dir,
    tiny_sd_dir,
)
