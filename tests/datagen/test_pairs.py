"""Image pairs by Stable Diffusion + Prompt-to-Prompt on the tiny offline model (CPU)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from services.common.diffusion import ModelUnavailable
from services.datagen.pair_params import (
    PairParams,
    PairSampling,
    pair_params_for_row,
    sample_pair_params,
)
from services.datagen.pair_pipeline import (
    PairGenerator,
    PairGeneratorConfig,
    load_text_to_image_pipeline,
)
from services.datagen.prompt_to_prompt import ALL_CROSS_ATTENTION, shared_token_map
from tests.datagen.conftest_images import SIZE, STEPS, Row, generator_config

ROW = Row()
SAME_CAPTIONS = dataclasses.replace(ROW, output_caption=ROW.input_caption)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def max_difference(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


# -- parameters --------------------------------------------------------------------------------


def test_pair_params_are_a_pure_function_of_run_seed_row_and_pair():
    first = pair_params_for_row(run_seed=7, row_index=3)
    assert first == pair_params_for_row(run_seed=7, row_index=3)
    assert [p.pair_index for p in first] == [0, 1, 2, 3]
    assert len({p.seed for p in first}) == 4
    assert first[2] == sample_pair_params(7, 3, 2)
    assert first != pair_params_for_row(run_seed=8, row_index=3)
    assert first != pair_params_for_row(run_seed=7, row_index=4)


def test_pair_params_are_drawn_from_the_ranges():
    sampling = PairSampling(pairs_per_row=2, p_range=(0.2, 0.3), text_guidance_range=(8.0, 9.0))
    params = [p for row in range(200) for p in pair_params_for_row(0, row, sampling)]
    assert len(params) == 400
    assert all(0.2 <= p.p <= 0.3 and 8.0 <= p.text_guidance <= 9.0 for p in params)
    assert all(0 <= p.seed < 2**32 for p in params)
    # Spread over the whole range, not stuck at one value.
    assert max(p.p for p in params) - min(p.p for p in params) > 0.08
    defaults = [p for row in range(50) for p in pair_params_for_row(1, row)]
    assert all(0.1 <= p.p <= 0.9 and 7.5 <= p.text_guidance <= 15.0 for p in defaults)


@pytest.mark.parametrize(
    "options",
    [
        {"pairs_per_row": 0},
        {"p_range": (0.5, 0.4)},
        {"p_range": (0.0, 1.5)},
        {"text_guidance_range": (-1.0, 2.0)},
    ],
)
def test_pair_sampling_rejects_bad_settings(options):
    with pytest.raises(ValueError):
        PairSampling(**options)


def test_pair_params_validate():
    with pytest.raises(ValueError, match="p must be"):
        PairParams(pair_index=0, seed=1, p=1.5, text_guidance=7.5)
    with pytest.raises(ValueError, match="seed"):
        PairParams(pair_index=0, seed=2**32, p=0.5, text_guidance=7.5)


# -- the generator -----------------------------------------------------------------------------


def test_generate_row_makes_one_recorded_pair_per_params(pair_generator):
    params = pair_params_for_row(run_seed=0, row_index=ROW.index, sampling=PairSampling(3))
    progress = []
    pairs = pair_generator.generate_row(ROW, params, on_step=lambda *a: progress.append(a))
    steps = pair_generator.denoising_steps
    assert steps == STEPS + 1  # PNDM's extra warm-up evaluation
    assert progress == [(i, steps) for i in range(1, steps + 1)]  # one UNet batch for 3 pairs
    for pair, pair_params in zip(pairs, params, strict=True):
        assert (pair.row_index, pair.pair_index) == (ROW.index, pair_params.pair_index)
        assert (pair.seed, pair.p, pair.text_guidance) == (
            pair_params.seed,
            pair_params.p,
            pair_params.text_guidance,
        )
        assert (pair.category, pair.edit_type, pair.instruction) == (
            ROW.category,
            ROW.edit_type,
            ROW.instruction,
        )
        assert (pair.input_caption, pair.output_caption) == (ROW.input_caption, ROW.output_caption)
        assert pair.num_inference_steps == STEPS and pair.denoising_steps == steps
        # InstructPix2Pix's rule: step i injected iff p > i / (steps - 1).
        assert pair.injected_steps == sum(pair.p > i / (steps - 1) for i in range(steps))
        assert pair.input_image.size == pair.edited_image.size == (SIZE, SIZE)
        assert pair.input_image.mode == "RGB" and pair.scores is None
    # Different seeds, different pictures.
    assert max_difference(pairs[0].input_image, pairs[1].input_image) > 0


def test_identical_captions_give_identical_images_for_any_p(pair_generator):
    params = [PairParams(i, seed=40 + i, p=p, text_guidance=9.0) for i, p in enumerate((0, 0.5, 1))]
    for pair in pair_generator.generate_row(SAME_CAPTIONS, params):
        assert np.array_equal(pixels(pair.input_image), pixels(pair.edited_image)), pair.p


@pytest.fixture(scope="module")
def reference_pipeline(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text_to_image(pipe, caption: str, seed: int, guidance: float, output_type: str = "pil"):
    return pipe(
        caption,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type,
    ).images[0]


def test_p_zero_is_plain_text_to_image_of_each_caption(pair_generator, reference_pipeline):
    params = PairParams(0, seed=1234, p=0.0, text_guidance=11.5)
    pair = pair_generator.generate(ROW, params)
    for caption, image in (
        (ROW.input_caption, pair.input_image),
        (ROW.output_caption, pair.edited_image),
    ):
        expected = _text_to_image(reference_pipeline, caption, params.seed, params.text_guidance)
        # The pair goes through the UNet as a batch of 4, the pipeline as a batch of 2:
        # float32 sums may differ in the last bits, hence one grey level of slack.
        assert max_difference(image, expected) <= 1

    latents = pair_generator.denoise(ROW, [params])
    expected = _text_to_image(
        reference_pipeline, ROW.output_caption, params.seed, params.text_guidance, "latent"
    )
    assert latents[0, 1].shape == expected.shape
    assert torch.allclose(latents[0, 1], expected, atol=1e-4)


def test_injection_changes_the_output_but_not_the_input(pair_generator):
    plain = pair_generator.denoise(ROW, [PairParams(0, seed=5, p=0.0, text_guidance=9.0)])
    injected = pair_generator.denoise(ROW, [PairParams(0, seed=5, p=1.0, text_guidance=9.0)])
    assert torch.allclose(plain[0, 0], injected[0, 0], atol=1e-5)
    assert not torch.allclose(plain[0, 1], injected[0, 1], atol=1e-3)


def test_pairs_batched_together_equal_pairs_made_alone(pair_generator):
    params = [PairParams(i, seed=70 + i, p=0.2 + 0.3 * i, text_guidance=8.0 + i) for i in range(3)]
    together = pair_generator.denoise(ROW, params)
    for index, pair_params in enumerate(params):
        alone = pair_generator.denoise(ROW, [pair_params])
        assert torch.allclose(together[index], alone[0], atol=1e-4)


def test_rows_with_more_pairs_than_a_batch_are_split(tiny_sd_dir):
    generator = PairGenerator(generator_config(tiny_sd_dir, max_pairs_per_batch=2))
    generator.setup()
    progress = []
    params = pair_params_for_row(3, 0, PairSampling(3))
    pairs = generator.generate_row(ROW, params, on_step=lambda *a: progress.append(a))
    assert [p.pair_index for p in pairs] == [0, 1, 2]
    steps = generator.denoising_steps
    assert progress[-1] == (2 * steps, 2 * steps) and len(progress) == 2 * steps


@pytest.fixture(scope="module")
def recording_generator(tiny_sd_dir):
    generator = PairGenerator(
        generator_config(tiny_sd_dir, cross_attention_layers=ALL_CROSS_ATTENTION)
    )
    generator.setup()
    generator.controller.record = True
    return generator


def test_injected_attention_maps_are_exactly_the_input_branch_maps(recording_generator):
    generator = recording_generator
    controller = generator.controller
    params = [PairParams(0, seed=11, p=0.5, text_guidance=9.0), PairParams(1, 12, 0.25, 12.0)]
    generator.denoise(ROW, params)
    steps = generator.denoising_steps
    injected = [pair.injected_steps for pair in generator.generate_row(ROW, params)]
    assert injected == [2, 1]
    records = controller.records
    layers = controller.controlled_layers
    assert len(records) == steps * len(layers)  # every controlled layer at every step
    assert {r.layer for r in records} == set(layers)

    tokenizer = generator.pipe.tokenizer

    def ids(text):
        return tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids

    token_map = shared_token_map(
        ids(ROW.input_caption), ids(ROW.output_caption), tokenizer.eos_token_id
    )
    shared = torch.tensor(token_map.shared)
    source = torch.tensor(token_map.source)[shared]
    assert 0 < int(shared.sum()) < 77  # the captions share some tokens, not all

    own_maps_differed = False
    for record in records:
        for pair, count in enumerate(injected):
            maps = record.maps[:, pair]  # (guidance half, branch, heads, queries, keys)
            input_maps, output_maps = maps[:, 0], maps[:, 1]
            own = record.own_output_maps[:, pair]
            if record.step < count:
                assert bool(record.injected[1, pair])
                if record.is_cross:
                    # The conditional half only; the unconditional one keeps its maps.
                    assert not bool(record.injected[0, pair])
                    assert torch.equal(output_maps[1][..., shared], input_maps[1][..., source])
                    assert torch.equal(output_maps[1][..., ~shared], own[1][..., ~shared])
                    assert torch.equal(output_maps[0], own[0])
                else:
                    assert bool(record.injected[0, pair])
                    assert torch.equal(output_maps, input_maps), (record.layer, record.step)
            else:
                assert not bool(record.injected[:, pair].any())
                assert torch.equal(output_maps, own)
            own_maps_differed |= not torch.allclose(own, input_maps, atol=1e-4)
    # The copies replaced something: left alone, the output branch attends differently.
    assert own_maps_differed


def test_recording_does_not_change_the_pictures(tiny_sd_dir, recording_generator):
    fast = PairGenerator(generator_config(tiny_sd_dir, cross_attention_layers=ALL_CROSS_ATTENTION))
    fast.setup()
    params = [PairParams(0, seed=21, p=0.6, text_guidance=10.0)]
    expected = fast.denoise(ROW, params)
    assert torch.allclose(recording_generator.denoise(ROW, params), expected, atol=1e-4)


def test_cross_attention_injection_changes_the_output(pair_generator, tiny_sd_dir):
    cross = PairGenerator(generator_config(tiny_sd_dir, cross_attention_layers=ALL_CROSS_ATTENTION))
    cross.setup()
    params = [PairParams(0, seed=31, p=1.0, text_guidance=10.0)]
    self_only = pair_generator.denoise(ROW, params)
    with_cross = cross.denoise(ROW, params)
    assert torch.allclose(self_only[0, 0], with_cross[0, 0], atol=1e-5)
    assert not torch.allclose(self_only[0, 1], with_cross[0, 1], atol=1e-4)


def test_another_scheduler_by_name(tiny_sd_dir):
    generator = PairGenerator(
        generator_config(tiny_sd_dir, scheduler="EulerAncestralDiscreteScheduler")
    )
    info = generator.setup()
    assert info.scheduler == "EulerAncestralDiscreteScheduler"
    # A stochastic sampler draws the same noise in both branches: identical captions
    # still give identical pictures.
    pair = generator.generate(SAME_CAPTIONS, PairParams(0, seed=3, p=0.3, text_guidance=8.0))
    assert np.array_equal(pixels(pair.input_image), pixels(pair.edited_image))
    for name in ("NoSuchScheduler", "UNet2DConditionModel"):
        with pytest.raises(ValueError, match="unknown diffusers scheduler"):
            PairGenerator(generator_config(tiny_sd_dir, scheduler=name)).setup()


def test_setup_reports_the_model_and_defaults_to_the_native_size(tiny_sd_dir):
    generator = PairGenerator(generator_config(tiny_sd_dir, height=None, width=None))
    info = generator.setup()
    assert (info.device, info.dtype, info.height, info.width) == ("cpu", "float32", 64, 64)
    assert info.scheduler == "PNDMScheduler"
    assert info.controlled_layers == 4  # the tiny UNet's self-attention layers
    assert generator.setup() is info  # loaded once


def test_generate_needs_setup_and_a_valid_config(tiny_sd_dir):
    with pytest.raises(RuntimeError, match=r"setup\(\) was not called"):
        PairGenerator(generator_config(tiny_sd_dir)).generate(ROW, PairParams(0, 1, 0.5, 8.0))
    with pytest.raises(ValueError, match="multiple of 8"):
        PairGeneratorConfig(height=30)
    with pytest.raises(ValueError, match="num_inference_steps"):
        PairGeneratorConfig(num_inference_steps=0)


def test_config_from_settings(monkeypatch):
    from services.common.settings import Settings

    monkeypatch.setenv("INSTRUCTEDIT_DATAGEN_MODEL", "/models/sd15")
    monkeypatch.setenv("INSTRUCTEDIT_DEVICE", "cpu")
    config = PairGeneratorConfig.from_settings(Settings(), num_inference_steps=20)
    assert (config.model, config.device, config.num_inference_steps) == ("/models/sd15", "cpu", 20)
    assert PairGeneratorConfig().model == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_missing_models_are_reported_with_a_hint(tmp_path):
    with pytest.raises(ModelUnavailable, match="does not exist"):
        load_text_to_image_pipeline(str(tmp_path / "nope"), torch.float32)
    with pytest.raises(ModelUnavailable, match=r"no model_index\.json"):
        load_text_to_image_pipeline(str(tmp_path), torch.float32)


def test_a_same_length_word_swap_takes_the_replaced_word_s_cross_attention(
    recording_generator,
):
    # Hertz et al.'s word swap: "red" -> "tan" tokenize to runs of the same length, so the
    # new word's tokens attend with the maps of the old word's tokens, like every other
    # token: during injected steps the output branch's cross-attention maps are all the
    # input branch's.
    row = dataclasses.replace(
        ROW, input_caption="a red ceramic mug", output_caption="a tan ceramic mug"
    )
    generator = recording_generator
    tokenizer = generator.pipe.tokenizer

    def ids(text):
        return tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids

    token_map = shared_token_map(
        ids(row.input_caption), ids(row.output_caption), tokenizer.eos_token_id
    )
    assert token_map.source == tuple(range(77)) and all(token_map.shared)
    generator.denoise(row, [PairParams(0, seed=13, p=1.0, text_guidance=9.0)])
    cross = [r for r in generator.controller.records if r.is_cross]
    assert cross
    before, after = ids(row.input_caption), ids(row.output_caption)
    swapped = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert swapped  # "red" and "tan" differ
    own_differed = False
    for record in cross:
        maps = record.maps[:, 0]  # (guidance half, branch, heads, queries, keys)
        own = record.own_output_maps[:, 0]
        if record.step == generator.denoising_steps - 1:
            # p = 1 injects every step but the last (p > i / (N - 1)).
            assert torch.equal(maps[1, 1], own[1])
            continue
        # The conditional half takes the input branch's maps, the unconditional keeps its own.
        assert torch.equal(maps[1, 1], maps[1, 0]), (record.layer, record.step)
        assert torch.equal(maps[0, 1], own[0])
        own_differed |= not torch.allclose(own[1][..., swapped], maps[1, 0][..., swapped])
    # Without the swap the new word would have attended with its own, different maps.
    assert own_differed


def test_one_loaded_pipeline_serves_every_step_count_and_size(tiny_sd_dir, pair_generator):
    """Runs that differ only in steps or size must not load another UNet each."""
    import gc
    import weakref

    from services.common.datasets import DatasetSpec
    from services.datagen.builder import generator_for
    from services.datagen.pair_pipeline import get_pair_generator

    # The builder's generators control cross-attention too (runs choose their fraction).
    crossed = {"cross_attention_layers": ALL_CROSS_ATTENTION}
    first = get_pair_generator(generator_config(tiny_sd_dir, num_inference_steps=2, **crossed))
    second = get_pair_generator(
        generator_config(tiny_sd_dir, num_inference_steps=7, height=64, width=64, **crossed)
    )
    assert first is second
    specs = [
        DatasetSpec(num_rows=1, num_inference_steps=steps, resolution=size, **options)
        for steps, size, options in (
            (2, 64, {}),
            (30, None, {"scheduler": "ddim", "negative_prompt": "blurry"}),
            (50, 128, {"cross_attention_fraction": 0.4, "candidate_batch_size": 3}),
        )
    ]
    assert all(generator_for(spec, str(tiny_sd_dir), "cpu") is first for spec in specs)

    # Steps and size given per call make what a generator configured with them makes.
    params = [PairParams(0, seed=8, p=0.5, text_guidance=9.0)]
    pairs = first.generate_row(
        ROW,
        params,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        cross_attention_fraction=0.0,  # cross-attention layers then run plain SDPA
    )
    expected = pair_generator.generate_row(ROW, params)
    assert pairs[0].num_inference_steps == STEPS
    assert pairs[0].denoising_steps == expected[0].denoising_steps
    assert pairs[0].input_image.size == (SIZE, SIZE)
    assert max_difference(pairs[0].input_image, expected[0].input_image) <= 1
    assert max_difference(pairs[0].edited_image, expected[0].edited_image) <= 1
    bigger = first.generate_row(ROW, params, num_inference_steps=2, height=48, width=40)
    assert bigger[0].input_image.size == (40, 48) and bigger[0].num_inference_steps == 2

    # Another model (here: other injected layers) replaces the loaded one: one at a time.
    loaded = weakref.ref(first)
    del first, second
    other = get_pair_generator(generator_config(tiny_sd_dir))
    gc.collect()
    assert loaded() is None
    assert other.config.cross_attention_layers is None
