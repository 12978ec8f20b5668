"""Full-resolution output: sizes, the photo's detail kept where the edit left it, and the
mask's guarantee that pixels beyond the feather band are the input's own bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bench.synthetic_photos import fabric
from services.gpu_worker.full_resolution import OutputShaper, feather_alpha, to_output

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]
LANCZOS = Image.Resampling.LANCZOS
# Model output noise: the VAE round trip never gives back exactly the pixels it got.
VAE_NOISE = 3


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth shading plus per-pixel texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    shade = 120 + 60 * np.sin(x / width * 4)[..., None] * np.array([1.0, 0.6, 0.3])
    shade = shade + 40 * np.cos(y / height * 3)[..., None] * np.array([0.2, 0.5, 1.0])
    texture = rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(shade + texture, 0, 255).astype(np.uint8))


def model_edit(model_input: Image.Image, changed_width: int, seed: int = 1) -> Image.Image:
    """What the model gives back: the left `changed_width` columns recoloured (red becomes
    green: channels rotated), and VAE-like noise of +-3 levels everywhere."""
    rng = np.random.default_rng(seed)
    pixels = np.array(model_input).astype(np.int16)
    pixels[:, :changed_width] = pixels[:, :changed_width][..., [2, 0, 1]]
    pixels += rng.integers(-VAE_NOISE, VAE_NOISE + 1, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def left_half_mask(size: tuple[int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return mask


def high_pass_energy(pixels: np.ndarray) -> float:
    """Mean squared difference from the 3x3 box mean: the energy of the finest detail."""
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = pixels.shape[:2]
    local = sum(padded[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9
    return float(((pixels - local) ** 2).mean())


@pytest.fixture(scope="module")
def fabric_case():
    original = fabric()
    model_input = original.resize((512, 512), LANCZOS)
    edited = model_edit(model_input, changed_width=256)
    return original, model_input, edited


@pytest.fixture(scope="module")
def stretched_case():
    """A 3:2 photo in the 640x384 bucket (5:3, so slightly stretched), its right half
    changed by the edit, and the left half as the mask."""
    original = photo(1200, 800)
    model_input = original.resize((640, 384), LANCZOS)
    edited = model_edit(model_input, changed_width=640)
    return original, model_input, edited, left_half_mask(original.size)


@pytest.mark.parametrize(
    ("size", "bucket"),
    [((1200, 800), (640, 384)), ((800, 1200), (384, 640)), ((900, 900), (512, 512))],
)
def test_output_has_the_requested_size(device, size, bucket):
    original = photo(*size)
    model_input = original.resize(bucket, LANCZOS)
    edited = model_edit(model_input, changed_width=bucket[0] // 3)
    full = to_output(original, model_input, edited, original.size, None, 0, device=device)
    assert (full.size, full.mode) == (original.size, "RGB")
    masked = to_output(
        original, model_input, edited, bucket, left_half_mask(size), 4, device=device
    )
    assert (masked.size, masked.mode) == (bucket, "RGB")


def test_model_size_without_mask_is_the_edit_itself(stretched_case):
    original, model_input, edited, _ = stretched_case
    assert to_output(original, model_input, edited, edited.size, None, 8) is edited


def test_detail_is_kept_where_the_edit_left_the_image(device, fabric_case):
    original, model_input, edited = fabric_case
    ours = np.asarray(to_output(original, model_input, edited, original.size, device=device))
    plain = np.asarray(edited.resize(original.size, LANCZOS))
    reference = np.asarray(original).astype(np.float64)
    unchanged = np.s_[:, 576:]  # right of the recoloured half, clear of its border
    ours, plain = ours[unchanged].astype(np.float64), plain[unchanged].astype(np.float64)
    reference = reference[unchanged]

    ours_error, plain_error = np.abs(ours - reference).mean(), np.abs(plain - reference).mean()
    assert ours_error < plain_error / 3, (ours_error, plain_error)
    assert ours_error < 2 * VAE_NOISE
    assert high_pass_energy(ours) >= 0.8 * high_pass_energy(reference)
    assert high_pass_energy(plain) < 0.2 * high_pass_energy(reference)  # the test has teeth


def test_edited_pixels_win_where_the_edit_changed_the_image(device, fabric_case):
    original, model_input, edited = fabric_case
    ours = np.asarray(to_output(original, model_input, edited, original.size, device=device))
    plain = np.asarray(edited.resize(original.size, LANCZOS))
    changed = np.s_[:, :448]  # inside the recoloured half
    ours_mean = ours[changed].reshape(-1, 3).mean(axis=0)
    plain_mean = plain[changed].reshape(-1, 3).mean(axis=0)
    original_mean = np.asarray(original)[changed].reshape(-1, 3).mean(axis=0)
    assert np.abs(ours_mean - plain_mean).max() < 1
    assert np.abs(ours_mean - original_mean).max() > 50
    # No weave from the original shows through: as smooth as the plain resize there.
    assert high_pass_energy(ours[changed].astype(np.float64)) < 2 * high_pass_energy(
        plain[changed].astype(np.float64)
    )


def test_beyond_the_feather_band_the_pixels_are_the_inputs(device, stretched_case):
    original, model_input, edited, mask = stretched_case
    feather, half = 8, original.width // 2
    unmasked = np.asarray(to_output(original, model_input, edited, original.size, device=device))
    out = np.asarray(to_output(original, model_input, edited, original.size, mask, feather, device))
    assert np.array_equal(out[:, half + feather :], np.asarray(original)[:, half + feather :])
    assert np.array_equal(out[:, : half - feather], unmasked[:, : half - feather])
    # The band itself blends: neither all the input's nor all the edit's pixels.
    band = np.s_[:, half - feather // 2 : half + feather // 2]
    assert not np.array_equal(out[band], np.asarray(original)[band])
    assert not np.array_equal(out[band], unmasked[band])


def test_feather_zero_is_a_hard_edge(device, stretched_case):
    original, model_input, edited, mask = stretched_case
    half = original.width // 2
    unmasked = np.asarray(to_output(original, model_input, edited, original.size, device=device))
    out = np.asarray(to_output(original, model_input, edited, original.size, mask, 0, device))
    assert np.array_equal(out[:, half:], np.asarray(original)[:, half:])
    assert np.array_equal(out[:, :half], unmasked[:, :half])


def test_all_white_mask_is_no_mask_and_all_black_is_the_input(device, stretched_case):
    original, model_input, edited, _ = stretched_case
    unmasked = to_output(original, model_input, edited, original.size, device=device)
    white, black = Image.new("L", original.size, 255), Image.new("L", original.size, 0)
    out = to_output(original, model_input, edited, original.size, white, 16, device)
    assert np.array_equal(np.asarray(out), np.asarray(unmasked))
    out = to_output(original, model_input, edited, original.size, black, 16, device)
    assert np.array_equal(np.asarray(out), np.asarray(original))


def test_mask_at_model_size_keeps_what_the_model_saw(device, stretched_case):
    original, model_input, edited, mask = stretched_case
    feather, half = 4, model_input.width // 2
    out = np.asarray(to_output(original, model_input, edited, edited.size, mask, feather, device))
    keep = np.s_[:, half + feather :]
    assert np.array_equal(out[keep], np.asarray(model_input)[keep])
    change = np.s_[:, : half - feather]
    assert np.array_equal(out[change], np.asarray(edited)[change])


@pytest.mark.parametrize("feather", [1, 2, 5, 8])
def test_feather_reaches_exactly_feather_pixels(device, feather):
    """One set pixel: alpha is non-zero exactly on the square of Chebyshev radius
    `feather` around it; a half-plane: exactly 1 from `feather` pixels inside on."""
    mask = torch.zeros(1, 1, 41, 41, dtype=torch.bool, device=device)
    mask[..., 20, 20] = True
    alpha = feather_alpha(mask, feather)[0, 0].cpu()
    expected = torch.zeros(41, 41, dtype=torch.bool)
    expected[20 - feather : 21 + feather, 20 - feather : 21 + feather] = True
    assert torch.equal(alpha > 0, expected)

    half_plane = torch.zeros(1, 1, 41, 41, dtype=torch.bool, device=device)
    half_plane[..., :, :20] = True
    alpha = feather_alpha(half_plane, feather)[0, 0].cpu()
    assert torch.all(alpha[:, : 20 - feather] == 1)
    assert torch.all(alpha[:, 20 + feather :] == 0)
    band = alpha[:, 20 - feather : 20 + feather]
    assert torch.all((band > 0) & (band < 1))


def test_rejects_sizes_it_cannot_produce(stretched_case):
    original, model_input, edited, mask = stretched_case
    with pytest.raises(ValueError, match="size"):
        to_output(original, model_input, edited, (1000, 700), None, 0)
    with pytest.raises(ValueError, match="mask"):
        to_output(original, model_input, edited, original.size, mask.resize((600, 400)), 8)


def test_one_shaper_makes_every_output_of_a_job_as_to_output_does(device, stretched_case):
    """The photo, its detail layer and the mask's alpha are made once for a job's
    outputs; each output is what `to_output` makes of it alone."""
    original, model_input, edited, mask = stretched_case
    others = [edited, model_edit(model_input, changed_width=320, seed=2)]
    for size in (original.size, model_input.size):
        shape = OutputShaper(original, model_input, size, mask, 8, device)
        for output in others:
            alone = to_output(original, model_input, output, size, mask, 8, device)
            assert np.array_equal(np.asarray(shape(output)), np.asarray(alone))
