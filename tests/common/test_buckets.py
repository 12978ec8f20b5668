"""Resolution buckets: a small fixed set per budget, each photo at the nearest aspect."""

import itertools
import math

import pytest

from services.common.buckets import (
    MAX_ASPECT,
    MIN_AREA,
    MULTIPLE,
    bucket_for,
    resolution_buckets,
)


@pytest.mark.parametrize("resolution", [128, 256, 512, 768, 1024])
def test_buckets_are_multiples_of_64_near_the_budget(resolution):
    area = resolution * resolution
    buckets = resolution_buckets(resolution)
    for width, height in buckets:
        assert width % MULTIPLE == 0 and height % MULTIPLE == 0
        assert MIN_AREA * area <= width * height <= area
        assert max(width, height) / min(width, height) <= MAX_ASPECT
        assert (height, width) in buckets  # portrait and landscape alike
    assert (resolution, resolution) in buckets


def test_the_families_budgets_give_the_usual_buckets():
    sd15 = resolution_buckets(512)
    assert {(512, 512), (576, 448), (640, 384), (768, 320), (1024, 256)} <= set(sd15)
    assert len(sd15) == 9
    sdxl = resolution_buckets(768)
    assert {(768, 768), (896, 640), (1024, 576), (1152, 512)} <= set(sdxl)
    # Each bucket is one more shape to compile and batch by: few, distinct aspects.
    assert len(sdxl) <= 13
    aspects = sorted(w / h for w, h in sdxl)
    assert all(b / a >= 1.1 for a, b in itertools.pairwise(aspects))


@pytest.mark.parametrize(
    "size,resolution,expected",
    [
        ((1200, 800), 512, (640, 384)),  # 3:2
        ((800, 1200), 512, (384, 640)),
        ((1600, 1200), 512, (576, 448)),  # 4:3
        ((1024, 1024), 768, (768, 768)),
        ((2048, 1365), 768, (896, 640)),
        ((40, 30), 512, (576, 448)),  # a thumbnail runs at the bucket, scaled up
        ((8000, 500), 512, (1024, 256)),  # past 4:1, the 4:1 bucket
        ((1200, 800), 128, (128, 128)),
    ],
)
def test_each_photo_runs_at_the_nearest_aspect(size, resolution, expected):
    assert bucket_for(*size, resolution) == expected


@pytest.mark.parametrize("resolution", [128, 512, 768])
def test_a_photo_at_a_bucket_size_runs_at_that_size(resolution):
    for size in resolution_buckets(resolution):
        assert bucket_for(*size, resolution) == size


def test_the_nearest_aspect_is_nearest_on_a_log_scale():
    buckets = resolution_buckets(512)
    for width, height in [(1000, 700), (700, 1000), (1920, 1080), (3000, 1000)]:
        chosen = bucket_for(width, height, 512)
        error = abs(math.log(chosen[0] / chosen[1]) - math.log(width / height))
        assert all(error <= abs(math.log(w / h) - math.log(width / height)) for w, h in buckets)


def test_degenerate_sizes_are_refused():
    with pytest.raises(ValueError):
        bucket_for(0, 10, 512)
    with pytest.raises(ValueError):
        resolution_buckets(32)
