"""The engine against the plain diffusers pipeline, on the tiny model, on CPU."""

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.edit_params import EditParams
from tests.reference import stock_edit


def reference(model_dir, image, params):
    return stock_edit(model_dir, image, params)


def product_photo(size=(64, 48)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_engine_reports_what_it_loaded(engine, tiny_model_dir):
    assert engine.info.device == "cpu"
    assert engine.info.dtype == "float32"
    assert engine.info.attention == "sdpa"
    assert engine.info.compiled is False


@pytest.mark.parametrize(
    "prompt,negative,seed,num_outputs,guidance,image_guidance",
    [
        ("print a spiderman logo on it", "blurry", 1234, 1, 6.0, 1.3),
        ("print a spiderman logo on it", None, 99, 2, 7.5, 1.5),
        ("put the ball on sand", None, 7, 1, 12.0, 1.0),
        ("change its color to grey", "low quality", 2**32 - 1, 3, 7.5, 2.5),
        # The paper's guidance wherever either scale differs from 1 (tests/reference.py).
        ("make it black", None, 5, 1, 1.0, 1.5),
        ("make it black", None, 5, 1, 7.5, 0.5),
        ("make it black", None, 5, 1, 1.0, 1.0),
    ],
)
def test_outputs_identical_to_plain_pipeline(
    engine, tiny_model_dir, prompt, negative, seed, num_outputs, guidance, image_guidance
):
    """The quality guard: our loop, prompt cache and decode change nothing."""
    params = EditParams(
        prompt=prompt,
        negative_prompt=negative,
        num_inference_steps=4,
        guidance_scale=guidance,
        image_guidance_scale=image_guidance,
        seed=seed,
        num_outputs=num_outputs,
    )
    image = product_photo()
    ours = engine.predict(image, params)
    theirs = reference(tiny_model_dir, image, params)
    assert len(ours) == len(theirs) == num_outputs
    for a, b in zip(ours, theirs, strict=True):
        assert a.size == (64, 48)
        assert np.array_equal(np.asarray(a), np.asarray(b))
    if num_outputs > 1:
        assert not np.array_equal(np.asarray(ours[0]), np.asarray(ours[1]))


def test_every_pair_of_scales_means_the_papers_formula(engine, tiny_model_dir):
    """(7.5, 0.99) and (1, 5) were (1, 1) under diffusers' rule; now each is the paper's
    formula from its three branches, and the three differ."""
    image = product_photo()
    outputs = []
    for text, image_scale in [(7.5, 0.99), (1.0, 5.0), (1.0, 1.0)]:
        params = EditParams(
            prompt="make it black",
            num_inference_steps=4,
            guidance_scale=text,
            image_guidance_scale=image_scale,
            seed=5,
        )
        (ours,) = engine.predict(image, params)
        (paper,) = reference(tiny_model_dir, image, params)
        assert np.array_equal(np.asarray(ours), np.asarray(paper))
        outputs.append(np.asarray(ours))
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.array_equal(outputs[i], outputs[j])


def test_seed_determines_output(engine):
    image = product_photo()
    a = engine.predict(image, EditParams(prompt="make it grey", num_inference_steps=3, seed=1))
    b = engine.predict(image, EditParams(prompt="make it grey", num_inference_steps=3, seed=1))
    c = engine.predict(image, EditParams(prompt="make it grey", num_inference_steps=3, seed=2))
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_step_callback_reports_progress_and_can_stop(engine):
    steps = []

    class Stop(Exception):
        pass

    def on_step(step, total):
        steps.append((step, total))
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        engine.predict(
            product_photo(), EditParams(prompt="x", num_inference_steps=10), on_step=on_step
        )
    assert steps == [(1, 10), (2, 10), (3, 10)]


def test_non_finite_decode_is_redone_in_float32(engine, monkeypatch):
    """An fp16 VAE overflow (inf/NaN pixels) must not come out as a black image."""
    vae = engine.pipe.vae
    real_decode = vae.decode
    calls = []

    def overflowing_once(latents, return_dict=False):
        calls.append(latents.dtype)
        out = real_decode(latents, return_dict=False)
        if len(calls) == 1:
            out = (torch.full_like(out[0], float("nan")),)
        return out

    monkeypatch.setattr(vae, "decode", overflowing_once)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = engine.decode(latents)
    assert len(calls) == 2
    pixels = np.asarray(images[0])
    assert pixels.std() > 0  # a real picture, not a constant black frame


def test_failed_float32_redecode_leaves_the_vae_in_its_serving_dtype(tiny_model_dir):
    """bfloat16 on CPU stands in for float16 on CUDA: a non-finite decode is redone in
    float32; if that fails too (out of memory), the VAE must go back to its dtype, or every
    later job's encode would fail on mismatched dtypes."""
    from services.gpu_worker.engine import EditEngine, EngineOptions

    engine = EditEngine(tiny_model_dir, EngineOptions(device="cpu"))
    engine.setup()
    engine.pipe.to(dtype=torch.bfloat16)

    def no_memory_in_float32(module, args):
        if args[0].dtype == torch.float32:
            raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 GiB")

    hook = engine.pipe.vae.decoder.register_forward_pre_hook(no_memory_in_float32)
    latents = torch.full((1, 4, 8, 8), float("nan"), dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.decode(latents)
    hook.remove()
    assert engine.pipe.vae.dtype == torch.bfloat16
    params = EditParams(prompt="make it red", num_inference_steps=2, seed=1)
    (image,) = engine.predict(product_photo(), params)  # the next job still works
    assert image.size == (64, 48)


def test_engine_options_are_the_settings_of_the_same_names():
    from services.common.settings import Settings
    from services.gpu_worker.engine import EngineOptions

    # sync_debug is the GPU benchmark's switch, not a deployment's.
    engine_only = {"sync_debug"}
    assert set(EngineOptions.model_fields) - engine_only <= set(Settings.model_fields)
    settings = Settings(
        device="cpu",
        max_batch=3,
        batch_buckets="1,3",
        compile_unet=True,
        compile_mode="max-autotune",
        warmup_buckets="128x128",
        attention="xformers",
        attention_slicing=True,
        vae_tiling=True,
        text_embedding_cache_size=7,
    )
    options = EngineOptions.from_settings(settings, device="cuda:1")
    for name in set(EngineOptions.model_fields) - engine_only:
        expected = "cuda:1" if name == "device" else getattr(settings, name)
        assert getattr(options, name) == expected, name
    assert options.batch_buckets == (1, 3)
    assert options.sync_debug is False


def test_batch_buckets_count_outputs_and_always_hold_one_job():
    from services.gpu_worker.engine import EditEngine, EngineOptions

    def buckets(**options):
        return EditEngine("unused", EngineOptions(**options)).batch_buckets

    assert buckets() == (1, 2, 4, 8)
    assert buckets(max_batch=4) == (1, 2, 4)
    assert buckets(max_batch=6) == (1, 2, 4, 6)
    assert buckets(max_batch=16) == (1, 2, 4, 8, 16)
    # A job may ask for 4 outputs: with max_batch 1 or 3 a batch still holds them.
    assert buckets(max_batch=1) == (1, 2, 4)
    assert buckets(max_batch=3, batch_buckets="1,3") == (1, 3, 4)
    assert buckets(batch_buckets=(8, 2, 2)) == (2, 8)


def _left_half_mask(size):
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return mask


def test_a_masked_edit_keeps_the_image_latents_outside_the_mask(engine, monkeypatch):
    """Blended latent diffusion: after the last step, latents outside the mask are exactly
    the input image's own; inside, the edit's."""
    image, size = product_photo((128, 128)), (128, 128)
    params = EditParams(prompt="make it black", num_inference_steps=4, seed=3)
    decoded = []
    decode = engine.family.decode
    monkeypatch.setattr(
        engine.family, "decode", lambda latents: decoded.append(latents) or decode(latents)
    )
    (unmasked,) = engine.predict(image, params)
    (masked,) = engine.predict(image, params, mask=_left_half_mask(size))
    with torch.inference_mode():
        own = engine.family.denoised_latents(engine.family.encode_image(image))
    free, kept = decoded
    half = own.shape[-1] // 2
    assert torch.equal(kept[..., half:], own[..., half:])
    assert not torch.equal(kept[..., :half], free[..., :half])
    assert not torch.allclose(kept[..., :half], own[..., :half], atol=0.1)
    assert not np.array_equal(np.asarray(masked), np.asarray(unmasked))


def test_a_mask_that_allows_every_pixel_is_no_mask(engine):
    image = product_photo((128, 128))
    params = EditParams(prompt="make it black", num_inference_steps=4, seed=3)
    (unmasked,) = engine.predict(image, params)
    (everywhere,) = engine.predict(image, params, mask=Image.new("L", (128, 128), 255))
    assert np.array_equal(np.asarray(unmasked), np.asarray(everywhere))


def test_masked_and_unmasked_jobs_share_a_batch(engine):
    from services.gpu_worker.engine import EditRequest

    image = product_photo((128, 128))
    a = EditParams(prompt="make it black", num_inference_steps=3, seed=1)
    b = EditParams(prompt="make it red", num_inference_steps=3, seed=2)
    mask = _left_half_mask((128, 128))
    alone = [engine.predict(image, a), engine.predict(image, b, mask=mask)]
    together = engine.predict_batch([EditRequest(image, a), EditRequest(image, b, mask=mask)])
    for solo, batched in zip(alone, together, strict=True):
        diff = np.abs(np.asarray(solo[0], dtype=int) - np.asarray(batched[0], dtype=int))
        assert diff.max() <= 1
