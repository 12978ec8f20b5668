"""Optional CLIP filter of image pairs, as in InstructPix2Pix's dataset generation.

Every pair gets four CLIP scores (InstructPix2Pix's names), all recorded:

* ``clip_sim_0``: cos(image 0, input caption), the input image shows its caption;
* ``clip_sim_1``: cos(image 1, output caption), the edited image shows its caption;
* ``clip_sim_dir``: cos(image 1 - image 0, output caption - input caption), the images
  changed the way the captions did (directional similarity);
* ``clip_sim_image``: cos(image 0, image 1), the edit kept the picture recognisable.

A pair passes when both caption similarities are >= 0.2, the directional one >= 0.2 and
the image one >= 0.75 (the defaults: InstructPix2Pix's paper; a dataset spec sets its own
as ``min_caption_similarity``, ``min_directional_similarity``, ``min_image_similarity``).
A dataset run judges its candidates batch by batch and keeps the first
``pairs_per_row`` passing ones (``builder``); ``filter_row``/``select_pairs`` keep, of a
row's passing pairs, the best ``max_pairs_per_row`` (4) by directional similarity, as
InstructPix2Pix's script does once all its candidates are made. On by default in dataset
specs; any CLIP checkpoint works (default ``openai/clip-vit-large-patch14``, the ViT-L/14
InstructPix2Pix used).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Protocol

import torch
import torch.nn.functional as F

from services.datagen.pair_params import ImagePair

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "SCORE_NAMES",
    "ClipFilter",
    "ClipFilterConfig",
    "FilterResult",
    "get_clip_filter",
    "passes",
    "select_pairs",
]

log = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
SCORE_NAMES = ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")


@dataclass(frozen=True, slots=True)
class ClipFilterConfig:
    model: str = DEFAULT_CLIP_MODEL  # Hub id or local directory (CLIPModel + CLIPProcessor)
    device: str = "auto"
    min_caption_similarity: float = 0.2  # clip_sim_0 and clip_sim_1
    min_directional_similarity: float = 0.2  # clip_sim_dir
    min_image_similarity: float = 0.75  # clip_sim_image
    max_pairs_per_row: int = 4
    # Images per CLIP forward pass.
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.max_pairs_per_row < 1:
            raise ValueError("max_pairs_per_row must be >= 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


@dataclass(frozen=True, slots=True)
class FilterResult:
    # The pairs kept, in their original order, with their scores.
    kept: list[ImagePair]
    # Every pair given, in order, with its scores (for logs and statistics).
    scored: list[ImagePair]


class Thresholds(Protocol):
    """What ``passes`` reads: a ClipFilterConfig, or a dataset spec."""

    @property
    def min_caption_similarity(self) -> float: ...
    @property
    def min_directional_similarity(self) -> float: ...
    @property
    def min_image_similarity(self) -> float: ...


def passes(scores: Mapping[str, float], config: Thresholds) -> bool:
    """Whether one pair's scores clear every threshold."""
    return (
        scores["clip_sim_0"] >= config.min_caption_similarity
        and scores["clip_sim_1"] >= config.min_caption_similarity
        and scores["clip_sim_dir"] >= config.min_directional_similarity
        and scores["clip_sim_image"] >= config.min_image_similarity
    )


def select_pairs(scored: Sequence[ImagePair], config: ClipFilterConfig) -> list[ImagePair]:
    """The passing pairs of one row, at most ``max_pairs_per_row`` of them, best
    directional similarity first when there are more; returned in their original order."""
    candidates = []
    for position, pair in enumerate(scored):
        if pair.scores is None:
            raise ValueError(f"pair {pair.pair_index} of row {pair.row_index} has no scores")
        if passes(pair.scores, config):
            candidates.append(position)
    # Ties keep the earlier pair, so the selection is deterministic.
    best = sorted(candidates, key=lambda position: -scored[position].scores["clip_sim_dir"])
    chosen = sorted(best[: config.max_pairs_per_row])
    return [scored[position] for position in chosen]


class ClipFilter:
    """Loads CLIP once (``setup``), scores pairs (``score``), filters a row (``filter_row``)."""

    def __init__(self, config: ClipFilterConfig | None = None) -> None:
        self.config = config or ClipFilterConfig()
        self.model = None
        self.processor = None
        self.device: torch.device | None = None

    def setup(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoProcessor, CLIPModel

        from services.common.diffusion import resolve_device, serving_dtype

        device = resolve_device(self.config.device)
        dtype = serving_dtype(device)
        self.processor = AutoProcessor.from_pretrained(self.config.model)
        self.model = CLIPModel.from_pretrained(self.config.model, dtype=dtype).to(device).eval()
        self.device = device
        log.info("CLIP filter ready: %s on %s (%s)", self.config.model, device, dtype)

    def _require_model(self):
        if self.model is None:
            raise RuntimeError("ClipFilter.setup() was not called")
        return self.model

    @staticmethod
    def _features(output) -> torch.Tensor:
        # transformers 4 returns the projected features, 5 an output whose pooler_output
        # holds them.
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        return F.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        model = self._require_model()
        tokens = self.processor.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.device)
        return self._features(
            model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        )

    @torch.inference_mode()
    def encode_images(self, images: Sequence) -> torch.Tensor:
        model = self._require_model()
        chunks = []
        size = self.config.batch_size
        for start in range(0, len(images), size):
            pixels = self.processor.image_processor(
                [image.convert("RGB") for image in images[start : start + size]],
                return_tensors="pt",
            )["pixel_values"]
            chunks.append(
                self._features(
                    model.get_image_features(
                        pixel_values=pixels.to(device=self.device, dtype=model.dtype)
                    )
                )
            )
        return torch.cat(chunks)

    def score(self, pairs: Sequence[ImagePair]) -> list[ImagePair]:
        """``pairs`` with their four CLIP scores attached, in order."""
        if not pairs:
            return []
        captions = list(
            dict.fromkeys(c for p in pairs for c in (p.input_caption, p.output_caption))
        )
        text_features = dict(zip(captions, self.encode_texts(captions), strict=True))
        images = [image for p in pairs for image in (p.input_image, p.edited_image)]
        image_features = self.encode_images(images).unflatten(0, (len(pairs), 2))
        text_0 = torch.stack([text_features[p.input_caption] for p in pairs])
        text_1 = torch.stack([text_features[p.output_caption] for p in pairs])
        image_0, image_1 = image_features[:, 0], image_features[:, 1]
        columns = {
            "clip_sim_0": F.cosine_similarity(image_0, text_0),
            "clip_sim_1": F.cosine_similarity(image_1, text_1),
            "clip_sim_dir": F.cosine_similarity(image_1 - image_0, text_1 - text_0),
            "clip_sim_image": F.cosine_similarity(image_0, image_1),
        }
        values = {name: column.tolist() for name, column in columns.items()}
        return [
            pair.with_scores({name: float(values[name][index]) for name in SCORE_NAMES})
            for index, pair in enumerate(pairs)
        ]

    def filter_row(self, pairs: Sequence[ImagePair]) -> FilterResult:
        """Score the pairs of one row and keep the passing, best ones."""
        scored = self.score(pairs)
        return FilterResult(kept=select_pairs(scored, self.config), scored=scored)


@cache
def get_clip_filter(config: ClipFilterConfig) -> ClipFilter:
    """The process-wide filter for ``config``, set up on first use."""
    clip_filter = ClipFilter(config)
    clip_filter.setup()
    return clip_filter
