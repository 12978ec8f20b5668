"""Draw samples/hoodie.jpg and samples/hoodie-background.png: the README's "black hoodie"
product photo and a mask of its background (white: the background may change), made by the
project (no photo can be downloaded here, and a shipped stock photo would need a
licence). A black hoodie on a light studio background with a soft shadow, fabric grain,
a kangaroo pocket, a hood and drawstrings: enough structure for an edit to keep.

    python scripts/make_sample_photo.py [samples]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

W, H = 640, 640
BLACK = (28, 28, 32)
EDGE = (52, 52, 58)


def hoodie_mask(scale: int = 4) -> Image.Image:
    """The garment's silhouette, drawn at `scale` times the size and reduced (antialiased)."""
    s = scale
    mask = Image.new("L", (W * s, H * s), 0)
    d = ImageDraw.Draw(mask)
    # Body, sleeves (slightly angled), cuffs and hem band.
    d.rounded_rectangle((190 * s, 170 * s, 450 * s, 560 * s), radius=40 * s, fill=255)
    d.polygon(
        [
            (200 * s, 180 * s),
            (120 * s, 300 * s),
            (95 * s, 520 * s),
            (150 * s, 530 * s),
            (175 * s, 330 * s),
            (205 * s, 300 * s),
        ],
        fill=255,
    )
    d.polygon(
        [
            (440 * s, 180 * s),
            (520 * s, 300 * s),
            (545 * s, 520 * s),
            (490 * s, 530 * s),
            (465 * s, 330 * s),
            (435 * s, 300 * s),
        ],
        fill=255,
    )
    # Hood behind the neckline.
    d.ellipse((250 * s, 95 * s, 390 * s, 235 * s), fill=255)
    return mask.resize((W, H), Image.LANCZOS)


def draw(seed: int = 7) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Studio background: a soft vertical gradient.
    y = np.linspace(0, 1, H)[:, None, None]
    background = (236 - 18 * y) * np.ones((H, W, 3)) + np.array([0, 0, 3.0])
    photo = Image.fromarray(background.astype(np.uint8))

    mask = hoodie_mask()
    shadow = mask.filter(ImageFilter.GaussianBlur(14)).point(lambda v: int(v * 0.35))
    photo.paste((120, 120, 125), (10, 14), shadow)

    # Fabric: black with a fine knit grain and gentle folds.
    yy, xx = np.mgrid[0:H, 0:W]
    folds = 6 * np.sin(xx / 37.0 + np.sin(yy / 61.0)) + 4 * np.cos(yy / 23.0)
    grain = rng.normal(0, 3.5, (H, W)) + 2.5 * ((xx + yy) % 2)
    cloth = np.clip(np.array(BLACK, float) + (folds + grain)[..., None], 0, 255)
    photo.paste(Image.fromarray(cloth.astype(np.uint8)), (0, 0), mask)

    d = ImageDraw.Draw(photo)
    # Hood opening, seams, pocket, cuffs, hem, drawstrings with aglets.
    d.ellipse((282, 125, 358, 205), fill=(12, 12, 14))
    d.arc((250, 95, 390, 235), 200, 340, fill=EDGE, width=2)
    d.line((320, 205, 320, 250), fill=EDGE, width=1)
    d.rounded_rectangle((245, 410, 395, 500), radius=18, outline=EDGE, width=2)
    d.line((190, 530, 450, 530), fill=EDGE, width=2)
    d.line((97, 500, 152, 508), fill=EDGE, width=2)
    d.line((488, 508, 543, 500), fill=EDGE, width=2)
    for x in (305, 335):
        d.line((x, 205, x + (x - 320) // 3, 300), fill=(225, 225, 225), width=3)
        d.rectangle(
            (x + (x - 320) // 3 - 2, 300, x + (x - 320) // 3 + 2, 312), fill=(170, 170, 175)
        )
    return photo.filter(ImageFilter.UnsharpMask(radius=1, percent=40))


def background_mask() -> Image.Image:
    """White where the edit may change the photo: everything but the hoodie."""
    return hoodie_mask().point(lambda v: 0 if v > 127 else 255)


def main(folder: str = "samples") -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    draw().save(out / "hoodie.jpg", "JPEG", quality=88, optimize=True)
    background_mask().save(out / "hoodie-background.png", optimize=True)
    print(out / "hoodie.jpg", out / "hoodie-background.png")


if __name__ == "__main__":
    main(*sys.argv[1:])
