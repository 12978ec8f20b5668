"""LoRA adapters in the engine and the runner: loaded on demand, kept in a small LRU, one
per batch, equal to diffusers' own pipeline after `load_lora_weights`, and never a reload
of the base model."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from services.common.adapters import WEIGHTS_FILE, AdapterStore
from services.common.edit_params import EditParams, batch_key
from services.common.jobs import JobErrorCode, JobStatus
from services.gpu_worker.adapters import (
    AdapterCache,
    AdapterResolver,
    AdapterUnavailable,
    ResolvedAdapter,
    write_tiny_lora,
)
from services.gpu_worker.edit_job import EditRunner
from services.gpu_worker.engine import EditEngine, EditRequest, EngineOptions
from tests.gpu_worker.lora_helpers import stock_edit_with_lora
from tests.gpu_worker.test_edit_runner import submit
from tests.reference import stock_edit

PARAMS = dict(prompt="make it red", seed=3, num_inference_steps=4)
IMAGE = Image.new("RGB", (128, 128), (200, 30, 30))


@pytest.fixture(scope="module")
def loras(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        name: write_tiny_lora(tiny_model_dir, root / name, seed=i) for i, name in enumerate("abc")
    }


@pytest.fixture
def lora_engine(tiny_model_dir, loras):
    """An engine of its own (the session's `engine` stays without adapters), whose
    adapters are the test LoRAs by name."""
    engine = EditEngine(tiny_model_dir, EngineOptions(device="cpu", adapter_cache_size=2))
    engine.setup()
    engine.set_adapter_resolver(lambda name: ResolvedAdapter(loras[name], "1"))
    return engine


def edit(engine, adapter=None, **params) -> np.ndarray:
    (image,) = engine.predict(IMAGE, EditParams(**{**PARAMS, **params}, adapter=adapter))
    return np.asarray(image)


def test_an_adapter_edit_is_the_stock_pipeline_after_load_lora_weights(
    lora_engine, tiny_model_dir, loras
):
    base = edit(lora_engine)
    with_a = edit(lora_engine, "a")
    assert not np.array_equal(base, with_a)  # the adapter changes the edit
    (reference,) = stock_edit_with_lora(tiny_model_dir, IMAGE, PARAMS, loras["a"])
    assert np.array_equal(with_a, np.asarray(reference))
    # Without it, right after, the edit is the base model's again: the stock pipeline's.
    after = edit(lora_engine)
    assert np.array_equal(after, base)
    assert np.array_equal(after, np.asarray(stock_edit(tiny_model_dir, IMAGE, PARAMS)[0]))


def test_switching_adapters_keeps_each_ones_output(lora_engine):
    first_a, first_b = edit(lora_engine, "a"), edit(lora_engine, "b")
    assert not np.array_equal(first_a, first_b)
    assert np.array_equal(edit(lora_engine, "a"), first_a)
    assert np.array_equal(edit(lora_engine, "b"), first_b)
    assert lora_engine.adapters.loads == 2  # both stayed loaded


def test_the_least_recently_used_adapter_is_dropped_and_loaded_again(lora_engine):
    cache = lora_engine.adapters
    outputs = {name: edit(lora_engine, name) for name in "ab"}
    edit(lora_engine, "a")  # b is now the least recently used
    outputs["c"] = edit(lora_engine, "c")
    assert cache.loaded == ["a", "c"] and cache.evictions == 1
    assert set(lora_engine.pipe.get_list_adapters()["unet"]) == {"a__1", "c__1"}
    again = edit(lora_engine, "b")  # loaded again, a dropped
    assert cache.loaded == ["c", "b"] and cache.loads == 4
    assert np.array_equal(again, outputs["b"])
    assert np.array_equal(edit(lora_engine, "c"), outputs["c"])


def test_adapters_never_reload_the_base_model(lora_engine):
    from diffusers import DiffusionPipeline, ModelMixin

    unet = lora_engine.pipe.unet
    weight = unet.conv_in.weight
    before = weight.detach().clone()
    refused = mock.Mock(side_effect=AssertionError("the base model was loaded again"))
    with (
        mock.patch.object(DiffusionPipeline, "from_pretrained", refused),
        mock.patch.object(ModelMixin, "from_pretrained", refused),
    ):
        for adapter in ["a", "b", "c", None, "a"]:
            edit(lora_engine, adapter)
    assert lora_engine.pipe.unet is unet and unet.conv_in.weight is weight
    assert np.array_equal(weight.detach().numpy(), before.numpy())
    refused.assert_not_called()


def test_jobs_batch_only_with_jobs_of_the_same_adapter(lora_engine):
    base = EditParams(**PARAMS)
    key = batch_key((128, 128), base)
    assert key == "128x128:4:euler_ancestral:cfg"  # unchanged for base-model jobs
    with_a = batch_key((128, 128), base.model_copy(update={"adapter": "a"}))
    with_b = batch_key((128, 128), base.model_copy(update={"adapter": "b"}))
    assert len({key, with_a, with_b}) == 3
    mixed = [EditRequest(IMAGE, base), EditRequest(IMAGE, base.model_copy(update={"adapter": "a"}))]
    with pytest.raises(ValueError, match="batch key"):
        lora_engine.predict_batch(mixed)


def test_a_batch_with_an_adapter_equals_its_jobs_alone(lora_engine):
    params = [EditParams(**{**PARAMS, "seed": seed}, adapter="a") for seed in (1, 2)]
    together = lora_engine.predict_batch([EditRequest(IMAGE, p) for p in params])
    for outcome, p in zip(together, params, strict=True):
        (alone,) = lora_engine.predict(IMAGE, p)
        diff = np.abs(np.asarray(outcome[0], dtype=int) - np.asarray(alone, dtype=int))
        assert diff.max() <= 1  # as batching is elsewhere (test_batching.py)


def test_text_embeddings_are_cached_per_adapter(lora_engine):
    lora_engine._embeds.clear()
    edit(lora_engine)
    edit(lora_engine, "a")
    edit(lora_engine, "b")
    # The base model's keys are (prompt, negative, guided); an adapter's lead with it.
    keys = set(lora_engine._embeds)
    assert keys == {(*adapter, "make it red", None, True) for adapter in [(), ("a__1",), ("b__1",)]}


def test_an_unknown_adapter_raises_and_leaves_the_model_as_it_was(lora_engine, loras):
    base = edit(lora_engine)
    with pytest.raises(AdapterUnavailable, match="'nope'"):
        edit(lora_engine, "nope")
    assert np.array_equal(edit(lora_engine), base)


def test_unreadable_weights_fail_without_leaving_a_partial_adapter(lora_engine, tmp_path):
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    lora_engine.set_adapter_resolver(lambda name: ResolvedAdapter(tmp_path, "1"))
    base = edit(lora_engine)
    with pytest.raises(AdapterUnavailable) as raised:
        edit(lora_engine, "broken")
    assert str(tmp_path) not in str(raised.value)
    assert lora_engine.adapters.loaded == []
    assert np.array_equal(edit(lora_engine), base)


def test_a_cache_without_a_resolver_knows_no_adapter():
    with pytest.raises(AdapterUnavailable, match="unknown"):
        AdapterCache(pipe=None).activate("a")


# -- the store's adapters, through the runner ------------------------------------------


def test_the_runner_runs_registered_adapters(lora_engine, jobs, storage, loras, tiny_model_dir):
    AdapterStore(jobs.redis).register(str(loras["a"]), "a", "shop-a")
    job = submit(jobs, storage, size=(128, 128), steps=3, seed=5, adapter="shop-a")
    results = EditRunner(lora_engine, jobs, storage).handle(job.id)
    assert results == {job.id: JobStatus.succeeded}
    done = jobs.get(job.id)
    got = np.asarray(_output(storage, done))
    reference = stock_edit_with_lora(tiny_model_dir, _input(storage, job), done.params, loras["a"])
    assert np.array_equal(got, np.asarray(reference[0]))


def test_a_job_whose_adapter_is_gone_fails_as_model_unavailable(lora_engine, jobs, storage, loras):
    store = AdapterStore(jobs.redis)
    store.register(str(loras["a"]), "a", "gone")
    job = submit(jobs, storage, adapter="gone")
    store.remove("gone")
    assert EditRunner(lora_engine, jobs, storage).handle(job.id) == {job.id: JobStatus.failed}
    error = jobs.get(job.id).error
    assert error.code == JobErrorCode.model_unavailable
    assert "'gone'" in error.message and "/" not in error.message


def test_storage_adapters_are_downloaded_once(jobs, storage, loras, tmp_path):
    storage.put(f"adapters/x/{WEIGHTS_FILE}", (loras["b"] / WEIGHTS_FILE).read_bytes())
    store = AdapterStore(jobs.redis, storage)
    adapter = store.register("storage:adapters/x", "x", "x")
    resolve = AdapterResolver(store, storage, tmp_path / "cache")
    resolved = resolve("x")
    assert resolved.revision == adapter.revision
    assert (resolved.path / WEIGHTS_FILE).read_bytes() == (loras["b"] / WEIGHTS_FILE).read_bytes()
    storage.delete(f"adapters/x/{WEIGHTS_FILE}")
    assert resolve("x") == resolved  # from the local copy
    with pytest.raises(AdapterUnavailable, match="not registered"):
        resolve("y")


def _output(storage, job) -> Image.Image:
    import io

    return Image.open(io.BytesIO(storage.get(job.output_keys[0])))


def _input(storage, job) -> Image.Image:
    import io

    return Image.open(io.BytesIO(storage.get(job.input_key))).convert("RGB")
