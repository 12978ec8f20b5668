"""Fixtures and helpers of the image-pair stage's tests (registered by conftest.py).

Everything runs offline on a CPU: a tiny random Stable Diffusion pipeline and a tiny
random CLIP, generated once per session, 32x32 pictures, a handful of denoising steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from services.datagen.pair_params import ImagePair

SIZE = 32
STEPS = 3  # PNDM: 4 UNet evaluations


@dataclass(frozen=True)
class Row:
    """A text row as the image stage sees it (services.datagen.text.TextRow has more)."""

    index: int = 0
    category: str = "home_kitchen"
    edit_type: str = "color_change"
    input_caption: str = "a red ceramic mug on a wooden table"
    instruction: str = "make it blue"
    output_caption: str = "a blue ceramic mug on a wooden table"


def fake_pair(
    row_index: int = 0,
    pair_index: int = 0,
    *,
    category: str = "home_kitchen",
    edit_type: str = "color_change",
    scores: dict[str, float] | None = None,
    size: int = 16,
) -> ImagePair:
    """An image pair without a model: two flat pictures, distinct per (row, pair)."""
    shade = (row_index * 37 + pair_index * 11) % 256
    pair = ImagePair(
        row_index=row_index,
        pair_index=pair_index,
        category=category,
        edit_type=edit_type,
        input_caption=f"a red mug number {row_index}",
        instruction="make it blue",
        output_caption=f"a blue mug number {row_index}",
        seed=1000 + row_index * 10 + pair_index,
        p=0.25 + pair_index / 10,
        text_guidance=7.5 + pair_index,
        num_inference_steps=STEPS,
        injected_steps=1,
        denoising_steps=STEPS + 1,
        input_image=Image.new("RGB", (size, size), (shade, 20, 30)),
        edited_image=Image.new("RGB", (size, size), (30, 20, shade)),
    )
    return pair.with_scores(scores) if scores is not None else pair


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    from services.datagen import tiny_sd

    directory = tmp_path_factory.mktemp("models") / "tiny-sd"
    tiny_sd.main([str(directory), "--seed", "0"])  # the CLI, as a developer runs it
    return directory


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from services.datagen import tiny_clip

    directory = tmp_path_factory.mktemp("models") / "tiny-clip"
    tiny_clip.main([str(directory), "--seed", "0"])
    return directory


def generator_config(model_dir: Path, **overrides):
    from services.datagen.pair_pipeline import PairGeneratorConfig

    options = {
        "model": str(model_dir),
        "device": "cpu",
        "num_inference_steps": STEPS,
        "height": SIZE,
        "width": SIZE,
        **overrides,
    }
    return PairGeneratorConfig(**options)


@pytest.fixture(scope="session")
def pair_generator(tiny_sd_dir):
    from services.datagen.pair_pipeline import PairGenerator

    generator = PairGenerator(generator_config(tiny_sd_dir))
    generator.setup()
    return generator


@pytest.fixture(scope="session")
def clip_filter(tiny_clip_dir):
    from services.datagen.clip_filter import ClipFilter, ClipFilterConfig

    clip = ClipFilter(ClipFilterConfig(model=str(tiny_clip_dir), device="cpu"))
    clip.setup()
    return clip


@pytest.fixture
def ctx(redis_url, tmp_path, tiny_sd_dir):
    """A datagen task context on real Redis, a file store and the tiny model; tasks it
    sends go to the datagen queue (a test takes them off with its own consumer)."""
    import redis

    from services.common.celery_app import create_celery_app
    from services.common.datasets import RunStore
    from services.common.queues import DATAGEN_QUEUE
    from services.common.settings import Settings
    from services.common.storage import FileStorage
    from services.datagen.run_tasks import RunContext

    celery = create_celery_app(Settings(redis_url=redis_url))
    return RunContext(
        runs=RunStore(redis.Redis.from_url(redis_url), ttl_s=3600),
        storage=FileStorage(tmp_path / "store"),
        default_model=str(tiny_sd_dir),
        device="cpu",
        send=lambda name, args, kwargs: celery.send_task(
            name, args=args, kwargs=kwargs, queue=DATAGEN_QUEUE
        ),
    )
