"""Image pairs: what each is made from (seed, Prompt-to-Prompt fraction p, text guidance)
and what comes out (``ImagePair``).

InstructPix2Pix makes several image pairs per caption pair, each with its own seed and
with p and the classifier-free text guidance drawn from ranges, because no single
setting suits every edit: a colour change needs attention kept for most steps, a
"make it a watercolor painting" very few. The values are recorded with each pair.

A row has *candidates* (InstructPix2Pix: 100 per caption pair) of which at most
``pairs_per_row`` are kept (4) once the CLIP filter has judged them. A pair's
``pair_index`` is its candidate index. Parameters are a pure function of (run seed, row
index, candidate index): a row regenerated alone, on another worker or in another order,
gets the very same candidates.

This module needs neither torch nor a model, so exporters and services can import it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DEFAULT_PAIRS_PER_ROW",
    "DEFAULT_P_RANGE",
    "DEFAULT_TEXT_GUIDANCE_RANGE",
    "EditRow",
    "ImagePair",
    "PairParams",
    "PairSampling",
    "pair_params_for_row",
    "sample_pair_params",
]

DEFAULT_PAIRS_PER_ROW = 4
DEFAULT_P_RANGE = (0.1, 0.9)
DEFAULT_TEXT_GUIDANCE_RANGE = (7.5, 15.0)
# Recorded values are rounded so the dataset shows exactly what was used.
_DECIMALS = 4


@dataclass(frozen=True, slots=True)
class PairParams:
    """How one image pair of a row is generated."""

    pair_index: int
    # Seeds the initial noise (and any sampler noise) of both images of the pair.
    seed: int
    # Fraction of the denoising steps during which the output image uses the input
    # image's attention maps: 0 = two independent images, 1 = injected throughout.
    p: float
    # Classifier-free guidance scale of both images.
    text_guidance: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.pair_index < 0:
            raise ValueError(f"pair_index must be >= 0, got {self.pair_index}")


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(
            f"{name} must be (min, max) with {low} <= min <= max <= {high}, got {value}"
        )


@dataclass(frozen=True, slots=True)
class PairSampling:
    """How many pairs a row keeps, how many candidates it may try for them, and the
    ranges p and text guidance are drawn from."""

    pairs_per_row: int = DEFAULT_PAIRS_PER_ROW
    p_range: tuple[float, float] = DEFAULT_P_RANGE
    text_guidance_range: tuple[float, float] = DEFAULT_TEXT_GUIDANCE_RANGE
    # Candidates per row; None = pairs_per_row (no filter: every candidate is kept).
    candidates_per_row: int | None = None

    def __post_init__(self) -> None:
        if self.pairs_per_row < 1:
            raise ValueError(f"pairs_per_row must be >= 1, got {self.pairs_per_row}")
        if self.candidates_per_row is not None and self.candidates_per_row < self.pairs_per_row:
            raise ValueError(
                f"candidates_per_row ({self.candidates_per_row}) must be >= pairs_per_row "
                f"({self.pairs_per_row})"
            )
        _check_range("p_range", self.p_range, 0.0, 1.0)
        _check_range("text_guidance_range", self.text_guidance_range, 0.0, 100.0)

    @property
    def candidates(self) -> int:
        """Candidates per row."""
        return self.candidates_per_row or self.pairs_per_row


def _rng(run_seed: int, row_index: int, pair_index: int) -> random.Random:
    # A hash of the three numbers, not Random((a, b, c)) nor hash(): both would depend on
    # the Python version or PYTHONHASHSEED.
    key = f"instructedit-pair:{run_seed}:{row_index}:{pair_index}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def _uniform(rng: random.Random, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return min(max(round(rng.uniform(low, high), _DECIMALS), low), high)


def sample_pair_params(
    run_seed: int, row_index: int, pair_index: int, sampling: PairSampling | None = None
) -> PairParams:
    """The parameters of pair ``pair_index`` of row ``row_index`` in run ``run_seed``."""
    sampling = sampling or PairSampling()
    rng = _rng(run_seed, row_index, pair_index)
    seed = rng.getrandbits(32)
    return PairParams(
        pair_index=pair_index,
        seed=seed,
        p=_uniform(rng, sampling.p_range),
        text_guidance=_uniform(rng, sampling.text_guidance_range),
    )


def pair_params_for_row(
    run_seed: int, row_index: int, sampling: PairSampling | None = None
) -> list[PairParams]:
    """All ``sampling.candidates`` candidates of one row, by candidate (pair) index.
    Candidate i is the same whatever the number of candidates."""
    sampling = sampling or PairSampling()
    return [
        sample_pair_params(run_seed, row_index, index, sampling)
        for index in range(sampling.candidates)
    ]


class EditRow(Protocol):
    """What the image stage needs of a text row; ``services.datagen.text.TextRow`` is one."""

    @property
    def index(self) -> int: ...
    @property
    def category(self) -> str: ...
    @property
    def edit_type(self) -> str: ...
    @property
    def input_caption(self) -> str: ...
    @property
    def instruction(self) -> str: ...
    @property
    def output_caption(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ImagePair:
    """One generated (input image, instruction, edited image) example and its provenance."""

    row_index: int
    pair_index: int
    category: str
    edit_type: str
    input_caption: str
    instruction: str
    output_caption: str
    seed: int
    p: float
    text_guidance: float
    num_inference_steps: int
    # Denoising steps (UNet evaluations) in which the output branch used the input
    # branch's attention maps, of ``denoising_steps``.
    injected_steps: int
    denoising_steps: int
    # PIL images as generated; PNG bytes when read back from storage for the export.
    input_image: Image.Image | bytes
    edited_image: Image.Image | bytes
    # CLIP filter scores (``clip_filter.SCORE_NAMES``), when the filter ran.
    scores: Mapping[str, float] | None = field(default=None)

    @classmethod
    def from_row(cls, row: EditRow, params: PairParams, **fields) -> ImagePair:
        return cls(
            row_index=row.index,
            pair_index=params.pair_index,
            category=row.category,
            edit_type=row.edit_type,
            input_caption=row.input_caption,
            instruction=row.instruction,
            output_caption=row.output_caption,
            seed=params.seed,
            p=params.p,
            text_guidance=params.text_guidance,
            **fields,
        )

    def with_scores(self, scores: Mapping[str, float]) -> ImagePair:
        return replace(self, scores=MappingProxyType(dict(scores)))
