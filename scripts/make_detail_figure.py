"""Regenerate docs/images/detail_transfer.png: plain resize against detail-preserving output.

    .venv/bin/python scripts/make_detail_figure.py [--out docs/images/detail_transfer.png]

A synthetic 1024x1024 product photo - red woven fabric (2 px checker, 4 px twill) with a
printed care label in small text - goes through the worker's path: LANCZOS down to the
512x512 bucket, an "edit" that recolours the left half (red to green) and adds +-3 levels
of noise everywhere (the VAE never returns its input exactly), then back to 1024x1024
either by a plain LANCZOS resize or by `to_output`. Two 128x128 crops, shown at 2x with
NEAREST so single pixels stay visible: the label (unchanged by the edit) and the border of
the recoloured half. Deterministic: same seeds, same bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
# Runnable as a plain script from anywhere: make the repository importable.
sys.path.insert(0, str(ROOT))

from bench.synthetic_photos import fabric  # noqa: E402
from services.gpu_worker.full_resolution import to_output  # noqa: E402

SIDE = 1024
BUCKET = (512, 512)
CROP = 128
ZOOM = 2
# (left, top) of each crop in the 1024 px photo, and what it shows.
CROPS = [
    ((600, 380), "unchanged by the edit: the printed label"),
    ((448, 600), "border of the edit: recoloured (left) and unchanged (right)"),
]
COLUMNS = ["original photo", "plain LANCZOS resize of the edit", "detail-preserving (ours)"]
MARGIN, TITLE = 10, 22
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)


def model_edit(model_input: Image.Image, seed: int = 1) -> Image.Image:
    """The left half recoloured (channels rotated: red becomes green), +-3 levels of noise."""
    rng = np.random.default_rng(seed)
    pixels = np.array(model_input).astype(np.int16)
    half = model_input.width // 2
    pixels[:, :half] = pixels[:, :half][..., [2, 0, 1]]
    pixels += rng.integers(-3, 4, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def panel(image: Image.Image, left: int, top: int) -> Image.Image:
    crop = image.crop((left, top, left + CROP, top + CROP))
    return crop.resize((CROP * ZOOM, CROP * ZOOM), Image.Resampling.NEAREST)


def figure() -> Image.Image:
    original = fabric()
    model_input = original.resize(BUCKET, Image.Resampling.LANCZOS)
    edited = model_edit(model_input)
    columns = [
        original,
        edited.resize(original.size, Image.Resampling.LANCZOS),
        to_output(original, model_input, edited, original.size, device="cpu"),
    ]
    font = ImageFont.load_default(size=13)
    shown = CROP * ZOOM
    width = len(COLUMNS) * (shown + MARGIN) + MARGIN
    height = len(CROPS) * (shown + 2 * TITLE + MARGIN) + MARGIN
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    for (left, top), caption in CROPS:
        draw.text((MARGIN, y), f"{caption} - crop at ({left}, {top}), 2x", fill=INK, font=font)
        y += TITLE
        for i, (title, image) in enumerate(zip(COLUMNS, columns, strict=True)):
            x = MARGIN + i * (shown + MARGIN)
            draw.text((x, y), title, fill=INK, font=font)
            canvas.paste(panel(image, left, top), (x, y + TITLE))
        y += TITLE + shown + MARGIN
    return canvas


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/images/detail_transfer.png")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure().save(args.out, format="PNG", optimize=True)
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
