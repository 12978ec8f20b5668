"""Shapes that compile once: after `warmup`, a compiled UNet compiles nothing more over a
workload of mixed aspect ratios, batch sizes, guidance modes, masks, samplers and jobs
leaving their batch; a compile after warm-up is counted, exported and logged; the warm-up
reports its time.

Runs on CPU with the tiny model (budget 128 px: buckets 256x64, 128x128, 64x256) and
inductor. Compiling one shape of the tiny UNet costs ~3 s here with inductor's cache warm
and ~20 s cold, so the always-run test warms 4 shapes; the exhaustive one (every bucket x
batch bucket x guidance mode: 18 shapes, several minutes cold) is marked slow
(`make test-slow`).
"""

from __future__ import annotations

import itertools
import logging
import time

import pytest
import torch
from prometheus_client import REGISTRY
from torch._dynamo.utils import counters

from services.common.buckets import resolution_buckets
from services.common.edit_params import EditParams
from services.common.schedulers import Scheduler
from services.gpu_worker.engine import EditEngine, EditRequest, EngineOptions, LeaveBatch
from tests.gpu_worker.test_batching import photo
from tests.gpu_worker.test_engine import _left_half_mask

SAMPLERS = itertools.cycle(
    [Scheduler.euler_ancestral, Scheduler.dpmpp_2m, Scheduler.lcm, Scheduler.ddim]
)
# Splits of a batch's outputs over its jobs (a job has 1 to 4).
SPLITS = {1: [[1]], 2: [[2], [1, 1]], 3: [[1, 2], [1, 1, 1]], 4: [[4], [2, 1, 1], [1, 1, 1, 1]]}


def leave_at_one(step, total):
    raise LeaveBatch


def workload(sizes, max_outputs):
    """Batches of every size in `sizes`, guided and not, of 1..max_outputs outputs in
    several splits over jobs, some masked, some with a job leaving after the first step,
    samplers of every timestep dtype (float and int64)."""
    seed = itertools.count()
    for size, guided in itertools.product(sizes, (True, False)):
        image = photo(size, 0)
        assert image.size == size
        mask = _left_half_mask(size)
        scales = {} if guided else {"guidance_scale": 1.0, "image_guidance_scale": 1.0}
        for total in range(1, max_outputs + 1):
            for split in SPLITS[total]:
                scheduler = next(SAMPLERS)
                requests = []
                for index, outputs in enumerate(split):
                    params = EditParams(
                        prompt=f"make it {index}",
                        seed=next(seed),
                        num_inference_steps=2,
                        num_outputs=outputs,
                        scheduler=scheduler,
                        **scales,
                    )
                    requests.append(
                        EditRequest(
                            image,
                            params,
                            on_step=leave_at_one if index == 1 and len(split) > 2 else None,
                            mask=mask if index % 2 else None,
                        )
                    )
                yield requests


def compiled(tiny_model_dir, **options) -> EditEngine:
    engine = EditEngine(
        tiny_model_dir,
        EngineOptions(device="cpu", compile_unet=True, compile_mode="default", **options),
    )
    engine.setup()
    return engine


def run(engine, sizes, max_outputs) -> int:
    graphs = counters["stats"]["unique_graphs"]
    batches = 0
    for requests in workload(sizes, max_outputs):
        outcomes = engine.predict_batch(requests)
        for request, outcome in zip(requests, outcomes, strict=True):
            if request.on_step is leave_at_one:
                assert isinstance(outcome, LeaveBatch)
            else:
                assert len(outcome) == request.params.num_outputs
        batches += 1
    assert counters["stats"]["unique_graphs"] == graphs
    return batches


def test_nothing_compiles_after_warm_up(tiny_model_dir):
    # One batch bucket of 4 outputs: every batch of 1..4 outputs runs padded to 4.
    engine = compiled(
        tiny_model_dir, max_batch=4, batch_buckets="4", warmup_buckets="128x128,256x64"
    )
    assert engine.batch_buckets == (4,)
    started = time.perf_counter()
    info = engine.warmup()
    assert [(p.size, p.guided, p.unet_batch) for p in engine.warmup_pairs] == [
        ((128, 128), True, 12),
        ((128, 128), False, 4),
        ((256, 64), True, 12),
        ((256, 64), False, 4),
    ]
    assert 0 < info.warmup_s <= time.perf_counter() - started + 0.01
    assert info.unet_graphs == engine.unet_graphs <= 4
    assert engine.info is info
    assert run(engine, [(128, 128), (256, 64)], 4) == 2 * 2 * 8
    assert engine.recompiles == 0


@pytest.mark.slow  # compiles 18 shapes
def test_nothing_compiles_after_warm_up_at_any_bucket_batch_size_or_guidance(
    tiny_model_dir,
):
    engine = compiled(tiny_model_dir, max_batch=4)
    assert engine.batch_buckets == (1, 2, 4)
    info = engine.warmup()  # the default with compile_unet: every resolution bucket
    sizes = list(resolution_buckets(engine.resolution))
    assert len(sizes) == 3
    assert len(engine.warmup_pairs) == 3 * 2 * 3
    for pair in engine.warmup_pairs:
        print(f"warm-up {pair}")
    print(f"warm-up of 18 shapes: {info.warmup_s:.1f} s, {info.unet_graphs} graphs")
    assert run(engine, sizes, 4) == 3 * 2 * 8
    assert engine.recompiles == 0


# -- the warm-up plan, the count of late compiles, the attention and sync-debug options ---


def plan_of(**options):
    engine = EditEngine("unused", EngineOptions(**options))
    engine.resolution = 128
    return engine.warmup_plan()


def test_the_default_warm_up_covers_every_shape_a_compiled_unet_can_meet():
    plan = plan_of(compile_unet=True, max_batch=4)
    assert len(plan) == 3 * 2 * 3
    assert {size for size, _, _ in plan} == set(resolution_buckets(128))
    assert {samples for _, _, samples in plan} == {1, 2, 4}
    assert {guided for _, guided, _ in plan} == {True, False}


def test_an_eager_engine_warms_one_square_guided_output():
    assert plan_of() == [((128, 128), True, 1)]
    assert plan_of(warmup_buckets="all") == [(size, True, 1) for size in resolution_buckets(128)]


def test_named_warm_up_sizes_snap_to_buckets(caplog):
    with caplog.at_level(logging.WARNING):
        plan = plan_of(compile_unet=True, batch_buckets="2", warmup_buckets="128x128,100x400")
    # The largest bucket is always max(max_batch, 4) = 8 outputs.
    assert plan == [
        ((128, 128), True, 2),
        ((128, 128), True, 8),
        ((128, 128), False, 2),
        ((128, 128), False, 8),
        ((64, 256), True, 2),
        ((64, 256), True, 8),
        ((64, 256), False, 2),
        ((64, 256), False, 8),
    ]
    assert "100x400 is not a bucket" in caplog.text


def _recompiles_total() -> float:
    return REGISTRY.get_sample_value("instructedit_unet_recompiles_total") or 0.0


def test_a_compile_after_warm_up_is_counted_exported_and_logged(
    tiny_model_dir, monkeypatch, caplog
):
    engine = EditEngine(tiny_model_dir, EngineOptions(device="cpu"))
    engine.setup()
    info = engine.warmup()
    assert info.warmup_s > 0
    assert info.unet_graphs is None  # not compiled
    assert len(engine.warmup_pairs) == 1
    # Dynamo's graph count as a compiled UNet meeting a new shape would move it.
    graph_counts = iter([10, 11])
    monkeypatch.setattr(engine, "_graph_count", lambda: next(graph_counts))
    before = _recompiles_total()
    with caplog.at_level(logging.WARNING):
        engine.predict(photo((128, 128), 0), EditParams(prompt="x", num_inference_steps=1))
    assert engine.recompiles == 1
    assert _recompiles_total() == before + 1
    assert "compiled 1 new graph(s) after warm-up, for 128x128 at 1 output(s)" in caplog.text


def test_attention_is_sdpa_unless_set_otherwise(tiny_model_dir, caplog):
    def attention(**options):
        engine = EditEngine(tiny_model_dir, EngineOptions(device="cpu", **options))
        return engine.setup().attention

    assert attention() == "sdpa"
    assert attention(attention="sliced") == "sliced"
    assert attention(attention_slicing=True) == "sliced"  # the older setting, still honoured
    with caplog.at_level(logging.WARNING):
        assert attention(attention="xformers") == "sdpa"  # needs CUDA
    assert "xformers needs CUDA" in caplog.text


def test_sync_debug_wraps_the_loop_on_cuda_and_restores_the_mode(tiny_model_dir, monkeypatch):
    engine = EditEngine(tiny_model_dir, EngineOptions(device="cpu", sync_debug=True))
    engine.setup()
    (image,) = engine.predict(photo((128, 128), 0), EditParams(prompt="x", num_inference_steps=1))
    assert image.size == (128, 128)  # on CPU a no-op

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(EditEngine, "device", property(lambda self: torch.device("cuda")))
    with pytest.raises(RuntimeError, match="inside"), engine._sync_debug():
        assert modes == ["error"]
        raise RuntimeError("inside")
    assert modes == ["error", 0]
