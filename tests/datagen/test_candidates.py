"""InstructPix2Pix's image-side recipe: many candidates per row, batched through the UNet,
judged batch by batch, the first passing ones kept, generation stopped once enough pass;
the spec's defaults and options; a run that keeps no pair fails with ``no_pairs_kept``.

Tiny random Stable Diffusion and CLIP on the CPU; the run tests use a real RunStore on
the test Redis and a real Celery producer, as test_run_tasks.py does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from services.common.datasets import DatasetSpec, RunStatus, row_key
from services.common.queues import DATAGEN_EXPORT_TASK, DATAGEN_QUEUE
from services.common.storage import FileStorage
from services.datagen.builder import DatasetBuilder
from services.datagen.pair_params import PairSampling, pair_params_for_row
from services.datagen.run_tasks import RunContext, RunFailed, export_run, generate_chunk
from tests.datagen.conftest_images import Row

ROW = Row()


class UNetCalls:
    """Counts the UNet's forward calls and their batch sizes."""

    def __init__(self, unet) -> None:
        self.batches: list[int] = []
        self._handle = unet.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.batches.append(args[0].shape[0])

    def __enter__(self) -> UNetCalls:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# -- the generator ---------------------------------------------------------------------------


def test_candidates_go_through_the_unet_in_batches(pair_generator):
    params = pair_params_for_row(5, ROW.index, PairSampling(1, candidates_per_row=10))
    steps = pair_generator.denoising_steps
    with UNetCalls(pair_generator.pipe.unet) as calls:
        result = pair_generator.generate_candidates(ROW, params, batch_size=4)
    # 3 batches (4 + 4 + 2 candidates) x steps, 4 UNet rows a candidate (2 images x CFG).
    assert calls.batches == [16] * steps + [16] * steps + [8] * steps
    assert result.batches == 3
    assert [p.pair_index for p in result.generated] == list(range(10))
    assert [p.pair_index for p in result.kept] == list(range(10))  # no judge, no keep
    # Batching changes nothing: each candidate is what it is when made alone.
    alone = pair_generator.generate_row(ROW, params[6:7])[0]
    assert (
        np.abs(_pixels(alone.edited_image) - _pixels(result.generated[6].edited_image)).max() <= 1
    )


def test_generation_stops_once_enough_candidates_pass(pair_generator):
    params = pair_params_for_row(5, ROW.index, PairSampling(2, candidates_per_row=12))
    passing = {1, 5, 6, 9}
    judged: list[list[int]] = []

    def judge(pairs):
        judged.append([p.pair_index for p in pairs])
        scored = [p.with_scores({"fake": float(p.pair_index)}) for p in pairs]
        return scored, [p.pair_index in passing for p in pairs]

    steps = pair_generator.denoising_steps
    with UNetCalls(pair_generator.pipe.unet) as calls:
        result = pair_generator.generate_candidates(ROW, params, judge, keep=2, batch_size=3)
    # Candidate 1 passes in the first batch, 5 in the second: the row stops there.
    assert judged == [[0, 1, 2], [3, 4, 5]]
    assert len(calls.batches) == 2 * steps and result.batches == 2
    assert [p.pair_index for p in result.kept] == [1, 5]
    assert [p.pair_index for p in result.generated] == [0, 1, 2, 3, 4, 5]
    assert all(p.scores is not None for p in result.generated)
    # Kept pairs have their pictures; the others' are dropped.
    assert result.kept[0].input_image.size == result.kept[1].edited_image.size
    assert all(p.input_image == b"" for p in result.generated if p.pair_index not in (1, 5))

    # Keeping 4 needs candidate 9: four batches; the first four passing, in order.
    four = pair_generator.generate_candidates(ROW, params, judge, keep=4, batch_size=3)
    assert [p.pair_index for p in four.kept] == [1, 5, 6, 9] and four.batches == 4
    # Deterministic: the same candidates whatever the batch size.
    other = pair_generator.generate_candidates(ROW, params, judge, keep=4, batch_size=5)
    assert [p.pair_index for p in other.kept] == [1, 5, 6, 9]
    assert [p.seed for p in other.kept] == [p.seed for p in four.kept]
    # Nothing passes: every candidate is made, none kept.
    none = pair_generator.generate_candidates(
        ROW, params, lambda pairs: (pairs, [False] * len(pairs)), keep=2, batch_size=5
    )
    assert none.kept == [] and len(none.generated) == 12 and none.batches == 3


def test_candidate_parameters_do_not_depend_on_the_candidate_count():
    few = pair_params_for_row(3, 7, PairSampling(4))
    many = pair_params_for_row(3, 7, PairSampling(4, candidates_per_row=100))
    assert len(many) == 100 and many[:4] == few
    assert len({p.seed for p in many}) == 100
    with pytest.raises(ValueError, match="candidates_per_row"):
        PairSampling(4, candidates_per_row=3)


def test_sampler_negative_prompt_and_cross_attention_fraction_are_per_call(tiny_sd_dir):
    from services.datagen.pair_params import PairParams
    from services.datagen.pair_pipeline import PairGenerator
    from services.datagen.prompt_to_prompt import ALL_CROSS_ATTENTION
    from tests.datagen.conftest_images import generator_config

    generator = PairGenerator(
        generator_config(tiny_sd_dir, cross_attention_layers=ALL_CROSS_ATTENTION)
    )
    generator.setup()
    params = [PairParams(0, seed=9, p=0.5, text_guidance=9.0)]
    # Euler ancestral evaluates the UNet once per step, PNDM once more.
    assert generator.count_denoising_steps(5, "euler_ancestral") == 5
    assert generator.count_denoising_steps(5) == 6
    pndm = generator.denoise(ROW, params, cross_attention_fraction=0.0)
    euler = generator.denoise(ROW, params, scheduler="euler_ancestral", cross_attention_fraction=0)
    assert not torch.allclose(pndm, euler, atol=1e-3)
    negative = generator.denoise(
        ROW, params, negative_prompt="blurry", cross_attention_fraction=0.0
    )
    assert not torch.allclose(pndm[0, 0], negative[0, 0], atol=1e-3)
    # The cross-attention fraction is its own: it changes only the output image.
    crossed = generator.denoise(ROW, params, cross_attention_fraction=1.0)
    assert torch.allclose(pndm[0, 0], crossed[0, 0], atol=1e-5)
    assert not torch.allclose(pndm[0, 1], crossed[0, 1], atol=1e-4)
    with pytest.raises(ValueError, match="unknown diffusers scheduler"):
        generator.denoise(ROW, params, scheduler="nope")


# -- the spec --------------------------------------------------------------------------------


def test_spec_defaults_are_instructpix2pix_s():
    spec = DatasetSpec(num_rows=1)
    assert (spec.pairs_per_row, spec.candidates, spec.filter) == (4, 100, True)
    assert (spec.scheduler, spec.num_inference_steps) == ("euler_ancestral", 100)
    assert spec.p_range == (0.1, 0.9) and spec.text_guidance_range == (7.5, 15.0)
    assert spec.cross_attention_fraction is None and spec.negative_prompt is None
    assert (
        spec.min_caption_similarity,
        spec.min_directional_similarity,
        spec.min_image_similarity,
    ) == (0.2, 0.2, 0.75)
    # Without the filter every candidate is kept: as many as pairs.
    assert DatasetSpec(num_rows=1, filter=False, pairs_per_row=3).candidates == 3
    assert DatasetSpec(num_rows=1, candidates_per_row=7).candidates == 7


@pytest.mark.parametrize(
    "options",
    [
        {"pairs_per_row": 5, "candidates_per_row": 4},
        {"candidates_per_row": 201},
        {"scheduler": "lcm"},
        {"scheduler": "NoSuchScheduler"},
        {"cross_attention_fraction": 1.5},
        {"min_image_similarity": 1.5},
        {"candidate_batch_size": 0},
    ],
)
def test_spec_rejects_bad_recipe_options(options):
    with pytest.raises(ValidationError):
        DatasetSpec(num_rows=1, **options)


# -- rows and runs with the real (tiny) CLIP filter --------------------------------------------

PERMISSIVE = {
    "min_caption_similarity": -1.0,
    "min_directional_similarity": -1.0,
    "min_image_similarity": -1.0,
}
# The tiny CLIP's directional similarity of random pictures never reaches 1.
IMPOSSIBLE = {**PERMISSIVE, "min_directional_similarity": 1.0}


def _spec(tiny_clip_dir, **overrides) -> DatasetSpec:
    options = {
        "num_rows": 2,
        "seed": 4,
        "pairs_per_row": 2,
        "candidates_per_row": 6,
        "candidate_batch_size": 4,
        "num_inference_steps": 2,
        "resolution": 64,
        "clip_model": str(tiny_clip_dir),
        **overrides,
    }
    return DatasetSpec(**options)


def test_a_row_keeps_the_first_passing_candidates_with_their_scores(
    pair_generator, clip_filter, tiny_clip_dir, tmp_path
):
    spec = _spec(tiny_clip_dir, **PERMISSIVE)
    storage = FileStorage(tmp_path)
    builder = DatasetBuilder("run-a", spec, storage, pair_generator, clip_filter)
    outcome = builder.process_row(0)
    # Every candidate passes: the first batch (4 candidates) holds the 2 pairs kept.
    assert (outcome.generated, outcome.kept) == (4, 2)
    manifest = json.loads(storage.get(row_key("run-a", 0)))
    assert [p["pair_index"] for p in manifest["pairs"]] == [0, 1]
    assert [p["pair_index"] for p in manifest["all_pairs"]] == [0, 1, 2, 3]
    assert all(set(p["scores"]) >= {"clip_sim_dir", "clip_sim_image"} for p in manifest["pairs"])
    # The spec's sampler was used: Euler ancestral, one UNet evaluation per step.
    assert manifest["pairs"][0]["denoising_steps"] == 2

    strict = _spec(tiny_clip_dir, **IMPOSSIBLE)
    nothing = DatasetBuilder("run-b", strict, storage, pair_generator, clip_filter)
    outcome = nothing.process_row(0)
    assert (outcome.generated, outcome.kept) == (6, 0)  # all candidates tried
    assert json.loads(storage.get(row_key("run-b", 0)))["pairs"] == []


def _queued_task_names(ctx: RunContext) -> list[str]:
    return [
        json.loads(raw)["headers"]["task"] for raw in ctx.runs.redis.lrange(DATAGEN_QUEUE, 0, -1)
    ]


def test_a_run_that_keeps_no_pair_fails_with_no_pairs_kept(ctx, tiny_clip_dir, tmp_path):
    spec = _spec(tiny_clip_dir, **IMPOSSIBLE)
    run, _ = ctx.runs.create_or_resume(spec, "key-1")
    assert generate_chunk(ctx, run.id, 0, 2, run.generation) == 2
    failed = ctx.runs.get(run.id)
    assert failed.status == RunStatus.failed
    assert failed.error.code == "no_pairs_kept"
    assert "12 candidate pair(s)" in failed.error.message
    assert "min_directional_similarity" in failed.error.message
    assert failed.progress.pairs_generated == 12 and failed.progress.pairs_kept == 0
    assert failed.export_prefix is None and failed.finished_at is not None
    # No export was enqueued, nothing exported.
    assert DATAGEN_EXPORT_TASK not in _queued_task_names(ctx)
    assert not (tmp_path / "store" / "datasets" / run.id / "export").exists()

    # An export enqueued anyway (before the check, by an older worker) refuses too.
    ctx.runs.transition(run.id, {RunStatus.failed}, status=RunStatus.exporting, error=None)
    with pytest.raises(RunFailed) as refused:
        export_run(ctx, run.id, run.generation)
    assert refused.value.code == "no_pairs_kept"

    # The same rows with permissive thresholds (another spec, another run) succeed.
    good, _ = ctx.runs.create_or_resume(_spec(tiny_clip_dir, **PERMISSIVE), "key-1")
    assert generate_chunk(ctx, good.id, 0, 2, good.generation) == 2
    assert ctx.runs.get(good.id).status == RunStatus.exporting
    assert export_run(ctx, good.id, good.generation)
    done = ctx.runs.get(good.id)
    assert done.status == RunStatus.succeeded
    assert done.progress.pairs_kept == 4 and done.progress.pairs_generated == 8
