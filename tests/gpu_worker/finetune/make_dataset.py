"""A tiny datagen export for tests: coloured squares on grey, recoloured red.

Written by datagen's own writer (``services.datagen.dataset_export.DatasetWriter``), so
the layout is exactly an export's: ``<dir>/data/train-*.parquet`` and ``<dir>/dataset_card.md``.
The edit is learnable: the input holds a square of some colour, the edited picture the
same square in red, and the prompt says so; some prompts name the square's side.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from services.common.storage import FileStorage
from services.datagen.dataset_export import DatasetWriter
from services.datagen.pair_params import ImagePair

BACKGROUND = (128, 128, 128)
RED = (220, 30, 30)
COLOURS = {
    "blue": (30, 60, 220),
    "green": (30, 180, 60),
    "yellow": (230, 210, 40),
    "white": (245, 245, 245),
}


def square_pair(
    size: tuple[int, int], colour: tuple[int, int, int], box: tuple[int, int, int, int]
) -> tuple[Image.Image, Image.Image]:
    """(input, edited): a ``colour`` square at ``box`` on grey, and the same in red."""
    pictures = []
    for fill in (colour, RED):
        image = Image.new("RGB", size, BACKGROUND)
        ImageDraw.Draw(image).rectangle(box, fill=fill)
        pictures.append(image)
    return pictures[0], pictures[1]


def tiny_pairs(
    rows: int = 12,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] = ((64, 48), (48, 64), (64, 64)),
) -> list[ImagePair]:
    rng = random.Random(seed)
    pairs = []
    for index in range(rows):
        width, height = sizes[index % len(sizes)]
        name, colour = rng.choice(sorted(COLOURS.items()))
        side = max(4, min(width, height) // 3)
        top = rng.randrange(0, height - side)
        # Every fourth row names the square's side, and the square is on that side.
        kind = index % 4
        if kind == 1:
            left = rng.randrange(0, width // 2 - side // 2)
            prompt = "make the square on the left red"
        elif kind == 3:
            left = rng.randrange(width // 2, width - side)
            prompt = "Turn the Right square red"
        else:
            left = rng.randrange(0, width - side)
            prompt = "make the square red"
        source, edited = square_pair((width, height), colour, (left, top, left + side, top + side))
        pairs.append(
            ImagePair(
                row_index=index,
                pair_index=0,
                category="toys",
                edit_type="color_change",
                input_caption=f"a {name} square on grey",
                instruction=prompt,
                output_caption="a red square on grey",
                seed=seed * 1000 + index,
                p=0.5,
                text_guidance=7.5,
                num_inference_steps=2,
                injected_steps=1,
                denoising_steps=2,
                input_image=source,
                edited_image=edited,
            )
        )
    return pairs


def write_tiny_export(
    directory: str | Path,
    rows: int = 12,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] = ((64, 48), (48, 64), (64, 64)),
    *,
    max_shard_bytes: int = 2**20,
) -> Path:
    """Write the export into ``directory`` (its storage root) and return ``directory``.
    A small ``max_shard_bytes`` splits it into several shards."""
    directory = Path(directory)
    with DatasetWriter(
        FileStorage(directory), "", max_shard_bytes=max_shard_bytes, row_group_size=4
    ) as writer:
        writer.add_many(tiny_pairs(rows, seed, sizes))
    return directory
