"""The CLIP filter's mechanics, with a tiny random CLIP (its scores mean nothing)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from services.datagen.clip_filter import (
    SCORE_NAMES,
    ClipFilter,
    ClipFilterConfig,
    passes,
    select_pairs,
)
from tests.datagen.conftest_images import fake_pair

PASSING = {"clip_sim_0": 0.3, "clip_sim_1": 0.3, "clip_sim_dir": 0.3, "clip_sim_image": 0.8}


def scored(pair_index: int, **scores: float):
    return fake_pair(pair_index=pair_index, scores={**PASSING, **scores})


def test_defaults_are_instruct_pix2pix_thresholds():
    config = ClipFilterConfig()
    assert config.model == "openai/clip-vit-large-patch14"
    assert (
        config.min_caption_similarity,
        config.min_directional_similarity,
        config.min_image_similarity,
        config.max_pairs_per_row,
    ) == (0.2, 0.2, 0.75, 4)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("clip_sim_0", 0.2, True),  # thresholds are inclusive
        ("clip_sim_0", 0.19, False),
        ("clip_sim_1", 0.19, False),
        ("clip_sim_dir", 0.19, False),
        ("clip_sim_image", 0.75, True),
        ("clip_sim_image", 0.74, False),
    ],
)
def test_each_threshold_applies(name, value, expected):
    assert passes({**PASSING, name: value}, ClipFilterConfig()) is expected


def test_select_keeps_the_best_passing_pairs_by_directional_similarity_in_pair_order():
    pairs = [
        scored(0, clip_sim_dir=0.5),
        scored(1, clip_sim_dir=0.9, clip_sim_image=0.5),  # best direction, but fails
        scored(2, clip_sim_dir=0.3),
        scored(3, clip_sim_dir=0.7),
        scored(4, clip_sim_dir=0.6),
        scored(5, clip_sim_dir=0.21),
        scored(6, clip_sim_dir=0.1),  # fails
    ]
    config = ClipFilterConfig(max_pairs_per_row=3)
    assert [p.pair_index for p in select_pairs(pairs, config)] == [0, 3, 4]
    assert [p.pair_index for p in select_pairs(pairs, ClipFilterConfig())] == [0, 2, 3, 4]
    assert select_pairs([scored(0, clip_sim_0=0.0)], config) == []
    # Ties keep the earlier pair.
    ties = [scored(i, clip_sim_dir=0.5) for i in range(3)]
    assert [p.pair_index for p in select_pairs(ties, ClipFilterConfig(max_pairs_per_row=2))] == [
        0,
        1,
    ]


def test_select_needs_scores():
    with pytest.raises(ValueError, match="no scores"):
        select_pairs([fake_pair()], ClipFilterConfig())


def test_config_validates():
    with pytest.raises(ValueError):
        ClipFilterConfig(max_pairs_per_row=0)


def test_scores_are_instruct_pix2pix_clip_similarities(clip_filter, tiny_clip_dir):
    pairs = [fake_pair(pair_index=i, size=40) for i in range(3)]
    result = clip_filter.score(pairs)
    assert [p.pair_index for p in result] == [0, 1, 2]
    assert all(set(p.scores) == set(SCORE_NAMES) for p in result)

    # Recompute by hand with the model and processor loaded independently.
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)

    def image_features(image):
        pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
        vision = model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(model.visual_projection(vision), dim=-1)

    def text_features(text):
        tokens = processor.tokenizer([text], return_tensors="pt")
        pooled = model.text_model(**tokens).pooler_output
        return F.normalize(model.text_projection(pooled), dim=-1)

    with torch.no_grad():
        for pair in result:
            i0, i1 = image_features(pair.input_image), image_features(pair.edited_image)
            t0, t1 = text_features(pair.input_caption), text_features(pair.output_caption)
            expected = {
                "clip_sim_0": F.cosine_similarity(i0, t0).item(),
                "clip_sim_1": F.cosine_similarity(i1, t1).item(),
                "clip_sim_dir": F.cosine_similarity(i1 - i0, t1 - t0).item(),
                "clip_sim_image": F.cosine_similarity(i0, i1).item(),
            }
            for name, value in expected.items():
                assert pair.scores[name] == pytest.approx(value, abs=1e-5), name


def test_identical_images_and_captions_score_as_expected(clip_filter):
    pair = fake_pair()
    same = dataclasses.replace(
        pair, edited_image=pair.input_image.copy(), output_caption=pair.input_caption
    )
    (result,) = clip_filter.score([same])
    assert result.scores["clip_sim_image"] == pytest.approx(1.0, abs=1e-5)
    assert result.scores["clip_sim_0"] == pytest.approx(result.scores["clip_sim_1"], abs=1e-6)
    assert result.scores["clip_sim_dir"] == 0.0  # no change in either direction
    assert clip_filter.score([]) == []


def test_filter_row_records_every_score_and_keeps_at_most_the_best(tiny_clip_dir):
    # Thresholds every pair clears, so only the per-row cap decides.
    config = ClipFilterConfig(
        model=str(tiny_clip_dir),
        device="cpu",
        min_caption_similarity=-1,
        min_directional_similarity=-1,
        min_image_similarity=-1,
        max_pairs_per_row=2,
    )
    clip = ClipFilter(config)
    clip.setup()
    pairs = [fake_pair(pair_index=i, size=24) for i in range(5)]
    result = clip.filter_row(pairs)
    assert [p.pair_index for p in result.scored] == [0, 1, 2, 3, 4]
    assert all(p.scores is not None for p in result.scored)
    by_direction = sorted(result.scored, key=lambda p: -p.scores["clip_sim_dir"])
    assert [p.pair_index for p in result.kept] == sorted(p.pair_index for p in by_direction[:2])
    assert all(p.scores is not None for p in result.kept)
    # Thresholds nothing clears keep nothing, but still record the scores.
    strict = ClipFilter(dataclasses.replace(config, min_image_similarity=1.01))
    strict.model, strict.processor, strict.device = clip.model, clip.processor, clip.device
    result = strict.filter_row(pairs)
    assert result.kept == [] and len(result.scored) == 5


def test_score_needs_setup():
    with pytest.raises(RuntimeError, match=r"setup\(\) was not called"):
        ClipFilter().score([fake_pair()])
