"""The edit at the size the client asked for, with the photo's own detail where it was kept.

InstructPix2Pix edits at a resolution bucket of about 512x512 pixels, while listings need
the product at 1000-2000 px. Resizing the model's output back up gives the right size but
the look of a 512 px photo: fabric weave, stitching and small print are gone. Most edits
change only part of the image, and wherever the model left the image alone the original
photo still holds that detail, so it is put back:

    up     = resize(edited, size)                    # the edit, at the output size
    detail = original - resize(model_input, size)    # what the bucket could not hold
    out    = up + weight * detail

`weight` is 1 where the edit left the image as it was (only the VAE's reconstruction error
separates `edited` from `model_input` there), 0 where the edit changed it (the edited
pixels win: no trace of the old content shows through a new logo), with a smooth step
between. Where the weight is 1 the output is the original plus the edit's low-frequency
change, so a faint colour drift the model introduced stays consistent across the image.

A mask (white = may change) is then composited over the original with a feathered edge
whose blur has finite support: beyond `feather` output pixels outside the mask, the output
pixels are the input's exactly (the same bytes in a PNG), not merely close.

Everything runs in torch on the engine's device, next to the model, rather than in Pillow
on one CPU core: uint8 at the ends, float32 in between. docs/IMAGES.md has the method,
a figure and timings (bench/full_resolution_bench.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The change measure: how far the edit moved the local mean colour, in 8-bit levels,
# at the bucket size. The signed difference edited - model_input is averaged over a
# (2 * CHANGE_BLUR_RADIUS + 1)^2 box before taking its magnitude, so zero-mean
# differences - the VAE's per-pixel reconstruction noise and the texture it smears -
# cancel out instead of adding up, while a recolouring or new content moves the mean.
CHANGE_BLUR_RADIUS = 4
# At most this much local mean change (2.4% of the range, about one just-noticeable
# colour difference) is "unchanged": the VAE round trip, the model's faint drift in areas
# the instruction did not touch, and any tint the VAE adds stay below it after the blur.
CHANGE_LOW = 6.0
# From this much on (8% of the range: plainly visible side by side) the edit changed the
# region and its pixels win. In between, the detail fades in smoothly (smoothstep), so
# an edit's border gets no visible seam.
CHANGE_HIGH = 20.0
# Masks are 0/255; after a bilinear resize to the bucket, at least half white is white.
MASK_THRESHOLD = 128


@torch.inference_mode()
def to_output(
    original: Image.Image,
    model_input: Image.Image,
    edited: Image.Image,
    size: tuple[int, int],
    mask: Image.Image | None = None,
    feather: int = 0,
    device: torch.device | str = "cpu",
) -> Image.Image:
    """The edit as an RGB image of `size`.

    `original` is the upright RGB photo, `model_input` what the model saw (the original
    resized to the bucket), `edited` the model's output at the bucket size. `size` is
    either `original.size` (detail-preserving upscaling) or the bucket (the edit as is).
    `mask` (mode "L", white = may change, at `original.size`) limits the edit; `feather`
    is the width of its soft edge in output pixels, 0 for a hard edge.
    """
    return OutputShaper(original, model_input, size, mask, feather, device)(edited)


class OutputShaper:
    """`to_output` for every output of one job: what they share (the photo on the device,
    its detail layer, the mask's alpha) is made once, when the job's outputs are, not
    once per output. Calls only read it, so outputs may be shaped on several threads."""

    @torch.inference_mode()
    def __init__(
        self,
        original: Image.Image,
        model_input: Image.Image,
        size: tuple[int, int],
        mask: Image.Image | None = None,
        feather: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.size = size = tuple(size)
        _check(original, model_input, model_input, size, mask, feather)
        self.bucket = bucket = model_input.size
        self.device = device = torch.device(device)
        self.passthrough = size == bucket and mask is None
        if self.passthrough:
            return
        # Outside the mask the output must be the client's own pixels: the photo itself
        # when the output has its size, else what the model saw.
        self.reference = _tensor(original if size == original.size else model_input, device)
        self.model_input = _tensor(model_input, device)
        self.detail = None
        if size != bucket:
            self.detail = _detail_layer(self.reference, self.model_input)
        self.alpha = None
        if mask is not None:
            self.alpha = feather_alpha(_binary_mask(mask, size, device), feather)

    @torch.inference_mode()
    def __call__(self, edited: Image.Image) -> Image.Image:
        if edited.mode != "RGB":
            raise ValueError(f"edited must be RGB, not {edited.mode}")
        if edited.size != self.bucket:
            raise ValueError(f"model_input is {self.bucket} but edited is {edited.size}")
        if self.passthrough:
            return edited
        result = _tensor(edited, self.device)
        if self.detail is not None:
            result = _with_detail(self.detail, self.model_input, result)
        if self.alpha is not None:
            result = composite(result, self.reference, self.alpha)
        return _image(result)


def upscale_with_detail(
    original: torch.Tensor, model_input: torch.Tensor, edited: torch.Tensor
) -> torch.Tensor:
    """uint8 (1, 3, H, W) at the original's size: the edit resized up, plus the original's
    detail layer wherever the edit left the image unchanged."""
    return _with_detail(_detail_layer(original, model_input), model_input, edited)


def _detail_layer(original: torch.Tensor, model_input: torch.Tensor) -> torch.Tensor:
    """float (1, 3, H, W): what the bucket could not hold, the original minus its own
    down-and-up-sampled version (the same filter the edit is resized up with)."""
    return original.float().sub_(resize(model_input.float(), original.shape[-2:]))


def _with_detail(
    detail: torch.Tensor, model_input: torch.Tensor, edited: torch.Tensor
) -> torch.Tensor:
    hw = detail.shape[-2:]
    weight = resize(change_weight(model_input.float(), edited.float()), hw, "bilinear")
    # `detail` is shared by a job's outputs: multiplied into a new tensor, not in place.
    return _to_uint8((detail * weight).add_(resize(edited.float(), hw)))


def change_weight(model_input: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """float (1, 1, h, w) at the bucket size: 1 where the edit left the image unchanged, 0
    where it changed it (see CHANGE_LOW and CHANGE_HIGH)."""
    local_change = box_blur(edited - model_input, (CHANGE_BLUR_RADIUS,))
    change = local_change.abs_().mean(dim=1, keepdim=True)
    t = change.sub_(CHANGE_LOW).div_(CHANGE_HIGH - CHANGE_LOW).clamp_(0, 1)
    return 1 - t * t * (3 - 2 * t)


def feather_alpha(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """float (1, 1, H, W) from a bool mask: the mask blurred by two box filters of radii
    ceil(feather / 2) and floor(feather / 2).

    Their combined support is exactly `feather` pixels (Chebyshev distance), so alpha is
    exactly 0 farther than `feather` from the mask and exactly 1 farther than `feather`
    inside it (see box_blur). A Gaussian would never reach 0. The image's border is
    extended (replicated), so a mask that reaches the border does not fade there.
    """
    return box_blur(mask.float(), ((feather + 1) // 2, feather // 2))


def composite(result: torch.Tensor, reference: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """uint8 alpha * result + (1 - alpha) * reference, and the reference's own bytes
    wherever alpha is 0."""
    blended = _to_uint8(torch.lerp(reference.float(), result.float(), alpha))
    return torch.where(alpha == 0, reference, blended)


def resize(x: torch.Tensor, hw: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """float (N, C, h, w) -> (N, C, *hw); antialiased, so downsizing does not alias."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=tuple(hw), mode=mode, antialias=True, align_corners=False)


def box_blur(x: torch.Tensor, radii: tuple[int, ...]) -> torch.Tensor:
    """Box means of (2r + 1)^2 pixels for each radius r in turn, separably, on the image
    extended by replicating its border.

    Pooling sums each window and divides by its size, so a window of zeros gives exactly
    0 and a window of ones exactly 1: the exactness the mask's feather relies on.
    """
    pad = sum(radii)
    if pad == 0:
        return x
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    for _ in ("rows", "columns"):
        for radius in filter(None, radii):
            x = F.avg_pool2d(x, (1, 2 * radius + 1), stride=1)
        # Columns as rows of the transpose: pooling down columns is 2-3x slower on a CPU.
        x = x.mT.contiguous()
    return x


def _binary_mask(mask: Image.Image, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """bool (1, 1, H, W) at `size`: resized bilinearly when that is not the mask's size."""
    values = torch.from_numpy(np.array(mask)).to(device)[None, None]
    if mask.size != size:
        values = resize(values.float(), (size[1], size[0]), "bilinear")
    return values >= MASK_THRESHOLD


def _tensor(image: Image.Image, device: torch.device) -> torch.Tensor:
    """uint8 (1, 3, H, W) on `device`; converted there, so only bytes cross the bus."""
    return torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)[None]


def _image(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x[0].permute(1, 2, 0).contiguous().cpu().numpy())


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_(0, 255).round_().to(torch.uint8)


def _check(original, model_input, edited, size, mask, feather) -> None:
    for name, image in (("original", original), ("model_input", model_input), ("edited", edited)):
        if image.mode != "RGB":
            raise ValueError(f"{name} must be RGB, not {image.mode}")
    if model_input.size != edited.size:
        raise ValueError(f"model_input is {model_input.size} but edited is {edited.size}")
    if tuple(size) not in (original.size, edited.size):
        raise ValueError(f"size {size} is neither the input's {original.size} nor the bucket")
    if mask is not None and (mask.mode != "L" or mask.size != original.size):
        raise ValueError(f"mask must be mode L at {original.size}, not {mask.mode} {mask.size}")
    if feather < 0:
        raise ValueError(f"feather must be >= 0, not {feather}")
