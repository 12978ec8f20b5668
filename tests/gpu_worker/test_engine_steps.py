"""The batched step on the engine's terms, for every sampler: one scheduler step for the
whole batch with each job's noise from its own generator, padding to batch buckets,
leaving a batch, and a denoising loop that never reads a device tensor on the host.

Tolerances as in tests/gpu_worker/test_batching.py: a job alone is bit-identical to the
stock pipeline; jobs batched together stay within one 8-bit level of the same jobs alone
(CPU kernels block their float32 arithmetic by batch size).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from services.common.diffusion import noise_draws
from services.common.edit_params import EditParams
from services.common.schedulers import Scheduler, build_scheduler
from services.gpu_worker import engine as engine_module
from services.gpu_worker.engine import EditEngine, EditRequest, EngineOptions, LeaveBatch
from tests.gpu_worker.test_batching import assert_close, photo
from tests.gpu_worker.test_engine import _left_half_mask, product_photo
from tests.reference import stock_edit

SAMPLERS = list(Scheduler)
# Multistep samplers keep per-sample history in the shared scheduler.
MULTISTEP = [Scheduler.dpmpp_2m, Scheduler.dpmpp_2m_karras, Scheduler.unipc]


def edit(seed, scheduler=Scheduler.euler_ancestral, steps=4, **params) -> EditParams:
    return EditParams(
        prompt="make it red", seed=seed, num_inference_steps=steps, scheduler=scheduler, **params
    )


def unet_batches(engine):
    calls = []
    hook = engine.pipe.unet.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0])
    )
    return calls, hook


def batch_with_a_leaver(engine, images, jobs, leaver: int):
    """Run the jobs as one batch, job `leaver` leaving it after step 2; the outcomes and
    the UNet's batch size at every call."""

    def leave_at_two(step, total):
        if step == 2:
            raise LeaveBatch

    requests = [EditRequest(im, p) for im, p in zip(images, jobs, strict=True)]
    requests[leaver].on_step = leave_at_two
    calls, hook = unet_batches(engine)
    try:
        return engine.predict_batch(requests), calls
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def padding_engine(tiny_model_dir):
    """An eager engine that pads batches to buckets as a compiled one does."""
    engine = EditEngine(tiny_model_dir, EngineOptions(device="cpu", max_batch=4))
    engine.setup()
    engine.pads_batches = True
    return engine


def test_which_samplers_draw_noise_in_their_step(engine):
    config = engine.pipe.scheduler.config
    draws = {
        name: [step for step, _ in noise_draws(build_scheduler(name, config), 5, torch.float32)]
        for name in SAMPLERS
    }
    assert draws[Scheduler.euler_ancestral] == [0, 1, 2, 3, 4]
    assert draws[Scheduler.lcm] == [0, 1, 2, 3]  # none at the last step
    for name in (Scheduler.euler, *MULTISTEP, Scheduler.ddim):
        assert draws[name] == [], name


@pytest.mark.parametrize("scheduler", SAMPLERS)
def test_a_job_alone_with_several_outputs_is_the_stock_pipeline(engine, tiny_model_dir, scheduler):
    """Each job draws its initial latents and every step's noise as one tensor of all
    its outputs, as the stock pipeline does, so this holds for num_outputs > 1 too."""
    params = edit(41, scheduler, num_outputs=2, negative_prompt="blurry")
    image = product_photo()
    ours = engine.predict(image, params)
    theirs = stock_edit(tiny_model_dir, image, params)
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(ours[0]), np.asarray(ours[1]))


@pytest.mark.parametrize("scheduler", SAMPLERS)
def test_a_batch_takes_one_scheduler_step_and_each_job_keeps_its_noise(
    engine, monkeypatch, scheduler
):
    images = [photo((128, 128), i) for i in range(3)]
    jobs = [
        edit(1, scheduler, num_outputs=2),
        edit(2, scheduler, guidance_scale=9.0, image_guidance_scale=1.2),
        edit(3, scheduler, guidance_scale=3.0, image_guidance_scale=2.0),
    ]
    masks = [None, _left_half_mask((128, 128)), None]
    alone = [engine.predict(im, p, mask=m) for im, p, m in zip(images, jobs, masks, strict=True)]
    steps = []
    real = engine_module.noise_injecting_step

    def counting(scheduler_class):
        step = real(scheduler_class)

        def counted(scheduler, model_output, *args, **kwargs):
            steps.append(model_output.shape[0])
            return step(scheduler, model_output, *args, **kwargs)

        return counted

    monkeypatch.setattr(engine_module, "noise_injecting_step", counting)
    batched = engine.predict_batch(
        [EditRequest(im, p, mask=m) for im, p, m in zip(images, jobs, masks, strict=True)]
    )
    assert steps == [4] * 4  # one scheduler step of all 4 outputs per denoising step
    for got, expected in zip(batched, alone, strict=True):
        assert_close(got, expected)


@pytest.mark.parametrize("scheduler", [Scheduler.euler_ancestral, *MULTISTEP, Scheduler.lcm])
def test_a_job_leaving_takes_its_rows_of_the_schedulers_history(engine, scheduler):
    images = [photo((128, 128), i) for i in range(3)]
    jobs = [edit(1, scheduler), edit(2, scheduler, num_outputs=2), edit(3, scheduler)]
    alone = [engine.predict(im, p) for im, p in zip(images, jobs, strict=True)]
    outcomes, calls = batch_with_a_leaver(engine, images, jobs, leaver=1)
    assert calls == [12, 12, 6, 6]
    assert isinstance(outcomes[1], LeaveBatch)
    assert_close(outcomes[0], alone[0])
    assert_close(outcomes[2], alone[2])


def test_batches_pad_to_buckets_and_padding_changes_no_job(padding_engine):
    engine = padding_engine
    assert engine.batch_buckets == (1, 2, 4)
    images = [photo((128, 128), i) for i in range(3)]
    jobs = [edit(i, Scheduler.dpmpp_2m) for i in range(3)]
    alone = [engine.predict(im, p) for im, p in zip(images, jobs, strict=True)]
    outcomes, calls = batch_with_a_leaver(engine, images, jobs, leaver=0)
    unguided = edit(7, guidance_scale=1.0, image_guidance_scale=1.0, steps=2)
    plain_calls, hook = unet_batches(engine)
    try:
        (plain,) = engine.predict_batch([EditRequest(images[0], unguided)])
    finally:
        hook.remove()
    # 3 outputs run as 4 (3 branches each), then 2 as 2; alone, one unguided output as 1.
    assert calls == [12, 12, 6, 6] and plain_calls == [1, 1]
    assert isinstance(outcomes[0], LeaveBatch)
    for index in (1, 2):
        assert_close(outcomes[index], alone[index])
    assert len(plain) == 1


def test_more_outputs_than_the_largest_bucket_run_as_consecutive_batches(padding_engine):
    engine = padding_engine
    image = photo((128, 128), 0)
    jobs = [edit(i, num_outputs=n, steps=2) for i, n in enumerate([3, 2, 1])]
    calls, hook = unet_batches(engine)
    try:
        outcomes = engine.predict_batch([EditRequest(image, p) for p in jobs])
    finally:
        hook.remove()
    # At most 4 outputs per UNet call: [3] padded to 4, then [2, 1] padded to 4.
    assert calls == [12, 12, 12, 12]
    assert [len(images) for images in outcomes] == [3, 2, 1]


# -- no host reads in the denoising loop ----------------------------------------------------

# Tensor methods and functions that bring a tensor's values to the host: on a GPU, each
# waits for the device (or is a Python branch on a value, which does the same).
HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.any,
    torch.Tensor.all,
    torch.equal,
}


class _HostReads(TorchFunctionMode):
    """Follows every tensor computed from the batch's tensors (the loop's device data;
    on CPU nothing else tells them from the schedulers' host-side scalars) and records
    each read of one on the host."""

    def __init__(self, roots) -> None:
        super().__init__()
        self.device_data = WeakIdKeyDictionary()
        for root in roots:
            self.device_data[root] = True
        self.reads: list[str] = []
        self.ops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        on_device = any(x in self.device_data for x in inputs)
        if on_device and func in HOST_READS:
            self.reads.append(getattr(func, "__qualname__", str(func)))
        result = func(*args, **kwargs)
        self.ops += 1
        if on_device:
            for x in tree_flatten(result)[0]:
                if isinstance(x, torch.Tensor):
                    self.device_data[x] = True
        return result


def _tensors(*objects):
    found = []
    for obj in objects:
        for x in tree_flatten(obj)[0]:
            if isinstance(x, torch.Tensor):
                found.append(x)
    return found


@pytest.mark.parametrize("scheduler", SAMPLERS)
def test_the_denoising_loop_reads_no_device_tensor_on_the_host(engine, monkeypatch, scheduler):
    modes = []
    denoise = engine._denoise

    def watched(batch):
        roots = _tensors(
            batch.latents,
            batch.model_input,
            list(batch.noise.draws),
            batch.unet_timesteps,
            batch.conditioning,
            [getattr(batch, name, None) for name in ("text_scale", "image_scale")],
            [batch.kept, batch.editable, batch.keep_weight],
        )
        modes.append(_HostReads(roots))
        return denoise(batch)

    @contextlib.contextmanager
    def checking():
        with modes[-1]:
            yield

    monkeypatch.setattr(engine, "_denoise", watched)
    monkeypatch.setattr(engine, "_sync_debug", checking)

    def leave_at_two(step, total):
        if step == 2:
            raise LeaveBatch

    image = photo((128, 128), 0)
    mask = _left_half_mask((128, 128))
    guided = [
        EditRequest(image, edit(1, scheduler, num_outputs=2)),
        EditRequest(image, edit(2, scheduler), on_step=leave_at_two),
        EditRequest(image, edit(3, scheduler), mask=mask),
    ]
    engine.predict_batch(guided)
    unguided = edit(4, scheduler, guidance_scale=1.0, image_guidance_scale=1.0)
    engine.predict_batch([EditRequest(image, unguided, mask=mask)])
    assert len(modes) == 2
    for mode in modes:
        assert mode.ops > 100  # it saw the UNet's and the sampler's work
        assert mode.reads == []
