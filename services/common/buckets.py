"""Resolution buckets: the sizes the model runs at.

A diffusion model works best near the pixel count it was trained at (512x512 for SD 1.5
InstructPix2Pix, 768x768 for SDXL InstructPix2Pix) and needs sides that are multiples of
64 (the VAE halves the size three times, the UNet three more). Product photos come in any
aspect ratio and size, so each one runs at the bucket of the model's fixed set whose aspect
ratio is nearest its own: a 3:2 photo at 640x384 rather than squashed into 512x512, a tiny
thumbnail scaled up to the bucket rather than run at its own size.

A fixed set is what makes batching and compilation work: every job of one bucket has the
same latent shape, so jobs share UNet calls and a compiled model sees a handful of shapes
instead of one per photo. The API keys its batching index by bucket, the worker runs by it.

The set for an area budget A (given as a side length: A = resolution^2) follows SDXL's
training buckets: for every width w (a multiple of 64), the largest height that keeps
w*h <= A, and the transposes, up to an aspect ratio of MAX_ASPECT; then thinned, so that
every bucket uses most of the budget (MIN_AREA) and neighbouring buckets differ in aspect
ratio by at least ASPECT_STEP: each bucket is one more shape to compile and to batch by.
"""

from __future__ import annotations

import math
from functools import cache

MULTIPLE = 64
# Beyond 4:1 a bucket has too few rows for the model to draw anything sensible; longer
# panoramas run at the 4:1 bucket, stretched, and come back at their own shape.
MAX_ASPECT = 4.0
# A bucket of 86% of the budget next to one of 94% at nearly the same aspect ratio only
# splits batches; the photo loses less by a few percent of stretch than by lost pixels.
MIN_AREA = 0.9
ASPECT_STEP = 1.1
# The budgets of the two model families (their training resolutions).
FAMILY_RESOLUTIONS = {"sd15": 512, "sdxl": 768}
DEFAULT_RESOLUTION = FAMILY_RESOLUTIONS["sd15"]


@cache
def resolution_buckets(resolution: int) -> tuple[tuple[int, int], ...]:
    """Every (width, height) bucket of the budget resolution^2, widest first."""
    if resolution < MULTIPLE:
        raise ValueError(f"a resolution budget of {resolution} px is below {MULTIPLE} px")
    area = resolution * resolution
    candidates = []
    width = MULTIPLE
    while width * MULTIPLE <= area:
        height = area // width // MULTIPLE * MULTIPLE
        if height <= width <= MAX_ASPECT * height and width * height >= MIN_AREA * area:
            candidates.append((width, height))
        width += MULTIPLE
    # The square bucket exists even when the resolution is not a multiple of 64.
    side = max(MULTIPLE, resolution // MULTIPLE * MULTIPLE)
    candidates.append((side, side))
    landscape: list[tuple[int, int]] = []
    for size in sorted(set(candidates), key=lambda s: s[0] / s[1]):
        if landscape and _aspect(size) < _aspect(landscape[-1]) * ASPECT_STEP:
            if size[0] * size[1] <= landscape[-1][0] * landscape[-1][1]:
                continue
            landscape.pop()  # as square a bucket with more pixels replaces it
        landscape.append(size)
    both = set(landscape) | {(h, w) for w, h in landscape}
    return tuple(sorted(both, key=lambda size: (-_aspect(size), -size[0])))


def _aspect(size: tuple[int, int]) -> float:
    return size[0] / size[1]


def bucket_for(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The bucket an image of width x height runs at: nearest in aspect ratio (on a log
    scale, so 2:1 and 1:2 are equally far from 1:1); of equal ones, the larger."""
    if width < 1 or height < 1:
        raise ValueError(f"no bucket for an image of {width}x{height}")
    aspect = math.log(width / height)

    def distance(size: tuple[int, int]) -> tuple[float, int]:
        return abs(math.log(size[0] / size[1]) - aspect), -size[0] * size[1]

    return min(resolution_buckets(resolution), key=distance)
