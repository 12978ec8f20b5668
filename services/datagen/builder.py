"""One dataset run, row by row into storage, then exported for fine-tuning.

The Celery tasks and the `run` command both drive this class. A row tries up to
``spec.candidates`` candidate pairs, ``spec.candidate_batch_size`` per UNet batch, each
batch CLIP-scored as soon as it is made (with ``spec.filter``), and stops once
``spec.pairs_per_row`` candidates have passed: those first passing ones, in candidate
order, are kept. A row where none passes keeps no pair (and a run that keeps none at all
fails, ``no_pairs_kept``). Each row is stored as its kept pairs' PNGs followed by a row
manifest (JSON); the manifest is written last, so its presence means the row is
complete. Re-running a row that has a manifest is skipped:
restarting workers or resubmitting a run never generates anything twice and loses
nothing already made.

The export needs no model: it copies the stored PNG bytes into the Parquet shards as they
are (decoding and re-encoding every picture was most of its time), reading rows ahead in
a few threads (an object store is slow one GET at a time).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

from services.common.datasets import (
    DatasetSpec,
    RowInput,
    RunSpec,
    export_prefix,
    pair_image_key,
    row_key,
)
from services.common.images import to_png
from services.common.storage import Storage
from services.datagen.pair_params import ImagePair, PairSampling, pair_params_for_row

log = logging.getLogger(__name__)

# Export read-ahead: rows read concurrently, and rows read ahead of the writer at most
# (bounds the memory: a row's pictures are a few MB at 512 px).
EXPORT_READERS = 8
EXPORT_READ_AHEAD = 32

# on_row(index): called by the export after each row it wrote; an exception raised in it
# (a cancellation) stops the export, which then writes nothing.
RowCallback = Callable[[int], None]


@dataclass(frozen=True)
class CaptionRow:
    """A row given by the client, shaped like the synthesizer's rows."""

    index: int
    category: str
    edit_type: str
    input_caption: str
    instruction: str
    output_caption: str


@dataclass(frozen=True)
class RowOutcome:
    index: int
    generated: int
    kept: int
    skipped: bool


@lru_cache(maxsize=4)
def _synthesized(
    num_rows: int, seed: int, edit_types: tuple[str, ...] | None, max_attributes: int
) -> tuple:
    from services.datagen.text import synthesize

    # The synthesizer is sequential (uniqueness across rows): build the run's rows once
    # per process and index into them.
    return tuple(synthesize(num_rows, seed, edit_types=edit_types, max_attributes=max_attributes))


# row_at(index): a caption row of the rows a run's spec gave, as stored apart from its
# record (RunStore.input_row).
RowSource = Callable[[int], RowInput]


def caption_row(spec: DatasetSpec | RunSpec, index: int, row_at: RowSource | None = None):
    """Row ``index`` of a run: given by the spec (in it, or read with ``row_at``), or made
    by the synthesizer."""
    given_rows = getattr(spec, "rows", None)
    if given_rows is not None:
        return CaptionRow(index=index, **given_rows[index].model_dump())
    if getattr(spec, "rows_count", None) is not None:
        if row_at is None:
            raise ValueError("the spec's rows are stored apart: give row_at to read them")
        return CaptionRow(index=index, **row_at(index).model_dump())
    edit_types = tuple(spec.edit_types) if spec.edit_types is not None else None
    return _synthesized(spec.num_rows, spec.seed, edit_types, spec.max_attributes)[index]


def model_name(spec: DatasetSpec | RunSpec, default_model: str) -> str:
    """The text-to-image model a run uses: its own, or the server's default."""
    return spec.model or default_model


class DatasetBuilder:
    def __init__(
        self,
        run_id: str,
        spec: DatasetSpec | RunSpec,
        storage: Storage,
        generator=None,
        clip=None,
        *,
        model: str | None = None,
        row_at: RowSource | None = None,
    ):
        """`generator`: a set-up PairGenerator, needed to make rows (not to export them);
        `clip`: a set-up ClipFilter when `spec.filter` is on and rows are made; `model`:
        the model's name for the dataset card (default: the generator's); `row_at`: reads
        a given row of a run whose record keeps only their count (a RunSpec)."""
        if generator is not None and spec.filter and clip is None:
            raise ValueError("the spec asks for filtering but no CLIP filter was given")
        if generator is None and model is None:
            raise ValueError("give the generator, or at least the model's name")
        self.run_id = run_id
        self.spec = spec
        self.storage = storage
        self.generator = generator
        self.clip = clip
        self.row_at = row_at
        self.model = model if model is not None else generator.config.model
        self.sampling = PairSampling(
            pairs_per_row=spec.pairs_per_row,
            p_range=spec.p_range,
            text_guidance_range=spec.text_guidance_range,
            candidates_per_row=spec.candidates,
        )

    def process_row(self, index: int) -> RowOutcome:
        key = row_key(self.run_id, index)
        if self.storage.exists(key):
            manifest = json.loads(self.storage.get(key))
            return RowOutcome(index, manifest["generated"], len(manifest["pairs"]), True)
        if self.generator is None:
            raise RuntimeError("this DatasetBuilder has no generator: it can only export")
        row = caption_row(self.spec, index, self.row_at)
        params = pair_params_for_row(self.spec.seed, index, self.sampling)
        # Options per call: the worker's one loaded pipeline serves every run.
        spec = self.spec
        result = self.generator.generate_candidates(
            row,
            params,
            judge=self._judge if spec.filter else None,
            keep=spec.pairs_per_row,
            num_inference_steps=spec.num_inference_steps,
            height=spec.resolution,
            width=spec.resolution,
            scheduler=spec.scheduler.value if spec.scheduler is not None else None,
            negative_prompt=spec.negative_prompt or "",
            cross_attention_fraction=spec.cross_attention_fraction or 0.0,
            batch_size=spec.candidate_batch_size,
        )
        kept, pairs = result.kept, result.generated
        entries = []
        for pair in kept:
            images = {}
            for which, image in (("input", pair.input_image), ("edited", pair.edited_image)):
                image_key = pair_image_key(self.run_id, index, pair.pair_index, which)
                self.storage.put(image_key, to_png(image), "image/png")
                images[which] = image_key
            entries.append({**_metadata(pair), "images": images})
        manifest = {
            "index": index,
            "generated": len(pairs),
            "pairs": entries,
            # Every pair's parameters and scores, kept or not, for later analysis.
            "all_pairs": [_metadata(pair) for pair in pairs],
        }
        self.storage.put(key, json.dumps(manifest).encode(), "application/json")
        return RowOutcome(index, len(pairs), len(kept), False)

    def _judge(self, pairs: list[ImagePair]) -> tuple[list[ImagePair], list[bool]]:
        """CLIP scores of a batch of candidates and whether each clears the spec's
        thresholds."""
        from services.datagen.clip_filter import passes

        scored = self.clip.score(pairs)
        # The spec names its thresholds as ClipFilterConfig does.
        return scored, [passes(pair.scores, self.spec) for pair in scored]

    def _stored_row(self, index: int) -> list[ImagePair]:
        """A stored row's kept pairs, their pictures as the stored PNG bytes."""
        manifest = json.loads(self.storage.get(row_key(self.run_id, index)))
        pairs = []
        for entry in manifest["pairs"]:
            images = {name: self.storage.get(key) for name, key in entry["images"].items()}
            fields = {k: v for k, v in entry.items() if k != "images"}
            pairs.append(
                ImagePair(**fields, input_image=images["input"], edited_image=images["edited"])
            )
        return pairs

    def stored_rows(self) -> Iterator[tuple[int, list[ImagePair]]]:
        """(row index, its kept pairs) of every row, in order, read ahead in threads."""
        rows = iter(range(self.spec.total_rows))
        with ThreadPoolExecutor(EXPORT_READERS, thread_name_prefix="export-read") as pool:
            pending: deque = deque()

            def read_ahead() -> None:
                while len(pending) < EXPORT_READ_AHEAD:
                    index = next(rows, None)
                    if index is None:
                        return
                    pending.append((index, pool.submit(self._stored_row, index)))

            read_ahead()
            try:
                while pending:
                    index, future = pending.popleft()
                    pairs = future.result()
                    read_ahead()
                    yield index, pairs
            finally:
                # Stopped early (an error, a cancel): drop the reads not started yet.
                for _, future in pending:
                    future.cancel()

    def stored_pairs(self) -> Iterator[ImagePair]:
        for _, pairs in self.stored_rows():
            yield from pairs

    def export(self, on_row: RowCallback | None = None):
        """Write the stored rows as the run's dataset (``dataset_export``)."""
        from services.datagen.dataset_export import DatasetWriter

        generation = {
            "rows": self.spec.total_rows,
            "pairs_per_row": self.spec.pairs_per_row,
            "candidates_per_row": self.spec.candidates,
            "model": self.model,
            "scheduler": self.spec.scheduler.value if self.spec.scheduler else "the model's own",
            "num_inference_steps": self.spec.num_inference_steps,
            "p_range": list(self.spec.p_range),
            "text_guidance_range": list(self.spec.text_guidance_range),
            "cross_attention_fraction": self.spec.cross_attention_fraction,
            "negative_prompt": self.spec.negative_prompt,
            "filter": self.spec.filter,
            **(
                {
                    name: getattr(self.spec, name)
                    for name in (
                        "min_caption_similarity",
                        "min_directional_similarity",
                        "min_image_similarity",
                    )
                }
                if self.spec.filter
                else {}
            ),
            "seed": self.spec.seed,
        }
        # Options left unset (no cross-attention, no negative prompt) are not listed.
        generation = {name: value for name, value in generation.items() if value is not None}
        with DatasetWriter(
            self.storage,
            export_prefix(self.run_id),
            with_scores=self.spec.filter,
            generation=generation,
        ) as writer:
            for index, pairs in self.stored_rows():
                writer.add_many(pairs)
                if on_row is not None:
                    on_row(index)
        return writer.summary


def _metadata(pair: ImagePair) -> dict:
    return {
        "row_index": pair.row_index,
        "pair_index": pair.pair_index,
        "category": pair.category,
        "edit_type": pair.edit_type,
        "input_caption": pair.input_caption,
        "instruction": pair.instruction,
        "output_caption": pair.output_caption,
        "seed": pair.seed,
        "p": pair.p,
        "text_guidance": pair.text_guidance,
        "num_inference_steps": pair.num_inference_steps,
        "injected_steps": pair.injected_steps,
        "denoising_steps": pair.denoising_steps,
        "scores": dict(pair.scores) if pair.scores is not None else None,
    }


def generator_for(spec: DatasetSpec | RunSpec, default_model: str, device: str):
    """The process-wide pair generator for a spec's model (steps, size, sampler, negative
    prompt, cross-attention fraction and batch size are passed per row, so runs that
    differ only in those share it). Cross-attention layers are always controlled: they
    run plain SDPA whenever a run injects none."""
    from services.datagen.pair_pipeline import PairGeneratorConfig, get_pair_generator
    from services.datagen.prompt_to_prompt import ALL_CROSS_ATTENTION

    return get_pair_generator(
        PairGeneratorConfig(
            model=model_name(spec, default_model),
            device=device,
            cross_attention_layers=ALL_CROSS_ATTENTION,
        )
    )


def clip_filter_for(spec: DatasetSpec | RunSpec, device: str):
    if not spec.filter:
        return None
    from services.datagen.clip_filter import (
        DEFAULT_CLIP_MODEL,
        ClipFilterConfig,
        get_clip_filter,
    )

    return get_clip_filter(
        ClipFilterConfig(model=spec.clip_model or DEFAULT_CLIP_MODEL, device=device)
    )
