"""Synthetic product photos with the fine detail real ones have, for the full-resolution
tests, benchmark and figure (no photo can be downloaded here)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def fabric(side: int = 1024, seed: int = 0) -> Image.Image:
    """Woven red fabric (a 2 px checker and a 4 px twill, thread irregularity, gentle
    shading) with a sewn-in label printed in small text on its right half."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side]
    checker = ((x + y) % 2) * 2 - 1.0
    twill = ((x // 2 + y // 2) % 2) * 2 - 1.0
    shade = 20 * np.sin(x / side * 3) * np.cos(y / side * 2)
    luminance = shade + 22 * checker + 10 * twill + rng.normal(0, 4, (side, side))
    pixels = np.array([150, 60, 50.0]) + luminance[..., None] * np.array([1, 0.8, 0.8])
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    left, top = 620, 400
    draw.rectangle((left, top, left + 300, top + 150), fill=(245, 245, 235), outline=(30, 30, 30))
    lines = ["100% ORGANIC COTTON", "MADE IN PORTUGAL", "WASH 30C DO NOT BLEACH", "RN 12345 M"]
    for i, line in enumerate(lines):
        draw.text((left + 10, top + 10 + 32 * i), line, fill=(20, 20, 20))
    return image
