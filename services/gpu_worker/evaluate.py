"""InstructPix2Pix's evaluation (Brooks et al. 2023, section 4, Figure 10) of the served
model: the trade-off between keeping the photo and following the edit, over guidance
scales.

    python -m services.gpu_worker.evaluate --model MODEL [--adapter DIR_OR_ID] \\
        [--compare-model MODEL2 [--compare-adapter DIR_OR_ID]] --dataset SRC [--rows 100] \\
        [--clip-model openai/clip-vit-large-patch14] \\
        [--image-guidance 1.0,1.2,1.5,1.8,2.2 --fixed-text-guidance 7.5] \\
        [--text-guidance 3,5,7.5,10,12.5 --fixed-image-guidance 1.5] \\
        [--steps 20] [--seed 0] [--device auto] --out DIR

Over held-out rows (input image, edit instruction, input and output captions), every
edit is made by the project's own engine (``EditEngine``, as the workers serve it) at
each point of two sweeps: S_I over ``--image-guidance`` at S_T = ``--fixed-text-guidance``,
and S_T over ``--text-guidance`` at S_I = ``--fixed-image-guidance``. Each output is
scored with CLIP (the paper's ViT-L/14 by default):

* image similarity, cos(E_img(output), E_img(input)): how much of the photo is kept;
* directional similarity, cos(E_img(output) - E_img(input), E_txt(output caption) -
  E_txt(input caption)): whether the image changed the way the caption did; 0 where the
  output's embedding equals the input's (no change has no direction).

``DIR/metrics.json`` holds, per model and sweep point, the scales, the mean (and standard
deviation) of both similarities and the number of rows; ``DIR/tradeoff.png`` plots them as
the paper's Figure 10 does (x: directional similarity, y: image similarity, a line per
sweep and model, each point labelled with its scale).

Rows (``load_eval_rows``): a datagen export (``services/datagen/dataset_export.py``: a
Parquet file, or a folder of them such as the export's prefix, columns ``input_image``,
``edit_prompt``, ``input_caption``, ``output_caption``; the paper's released dataset's
names ``original_image``, ``original_prompt``, ``edited_prompt`` work too), or a JSONL
file of ``{"input_image": path, "instruction", "input_caption", "output_caption"}`` with
paths relative to the file. ``--rows`` of them are drawn with ``--seed``, at most one
pair per caption row (``row_index``) while there are enough rows. Each row's edit uses
the seed ``--seed + its position``, the same at every sweep point and for both models,
so the curves differ by the scales and the model only.

``--adapter``: a LoRA (a directory or Hub id with diffusers LoRA weights, e.g. a
fine-tune's output) on the model. It runs the way the workers serve adapters: as the edit
parameter ``adapter`` (an id made from its location, which the engine's adapter resolver
points at it), so ``--model M --compare-model M --compare-adapter LORA`` loads M once and
compares the base model with the fine-tune. An engine without adapter support gets it
with ``pipe.load_lora_weights`` instead; metrics.json's ``adapter_mode`` says which.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "DEFAULT_IMAGE_GUIDANCE",
    "DEFAULT_TEXT_GUIDANCE",
    "EditCall",
    "EngineEditor",
    "EvalRow",
    "ModelSpec",
    "SweepPoint",
    "directional_similarity",
    "eval_adapter_id",
    "evaluate_model",
    "image_similarity",
    "load_engine",
    "load_eval_rows",
    "main",
    "plot_tradeoff",
    "run_evaluation",
    "score_edits",
    "sweep_points",
]

log = logging.getLogger(__name__)

DEFAULT_IMAGE_GUIDANCE = (1.0, 1.2, 1.5, 1.8, 2.2)
DEFAULT_TEXT_GUIDANCE = (3.0, 5.0, 7.5, 10.0, 12.5)
DEFAULT_FIXED_TEXT_GUIDANCE = 7.5
DEFAULT_FIXED_IMAGE_GUIDANCE = 1.5
# Below this norm an image embedding's change counts as none (directional similarity 0).
ZERO_DELTA = 1e-6

# Column names of each field, in order of preference: the datagen export's first, then
# those of the paper's released dataset (timbrooks/instructpix2pix-clip-filtered).
_COLUMN_NAMES = {
    "input_image": ("input_image", "original_image", "image"),
    "instruction": ("edit_prompt", "instruction"),
    "input_caption": ("input_caption", "original_prompt"),
    "output_caption": ("output_caption", "edited_prompt"),
}


# -- rows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalRow:
    """One held-out example: the photo, the instruction and the captions before and after."""

    image: Image.Image
    instruction: str
    input_caption: str
    output_caption: str
    source: str = ""  # where it came from, for logs


def _pick_column(names: Sequence[str], field_name: str, source: str) -> str:
    for name in _COLUMN_NAMES[field_name]:
        if name in names:
            return name
    raise ValueError(
        f"{source}: no column for {field_name} (looked for {', '.join(_COLUMN_NAMES[field_name])}"
        f"; columns are {', '.join(names)}). The evaluation needs the input image, the "
        "instruction and both captions."
    )


def _choose(count: int, n: int | None, seed: int, groups: Sequence[Any] | None) -> list[int]:
    """`n` of `count` indices drawn with `seed`, in drawn order: one per group first (a
    group = a caption row of several pairs), then the rest when `n` needs more."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    if n is None or n >= count:
        return order
    if groups is None:
        return order[:n]
    first, rest, seen = [], [], set()
    for index in order:
        key = groups[index]
        (rest if key in seen else first).append(index)
        seen.add(key)
    return (first + rest)[:n]


def _decode_image(value: Any, base: Path | None = None) -> Image.Image:
    """An image from a ``datasets`` Image struct ({bytes, path}), bytes or a path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError("image cell has neither bytes nor path")
    if isinstance(value, bytes | bytearray | memoryview):
        image = Image.open(io.BytesIO(bytes(value)))
    else:
        path = Path(value)
        if base is not None and not path.is_absolute():
            path = base / path
        image = Image.open(path)
    return image.convert("RGB")


def _parquet_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    files = sorted(source.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{source}: no Parquet files in this folder")
    return files


def _load_parquet(source: Path, n: int | None, seed: int) -> list[EvalRow]:
    import pyarrow.dataset as ds

    dataset = ds.dataset([str(path) for path in _parquet_files(source)], format="parquet")
    names = dataset.schema.names
    columns = {name: _pick_column(names, name, str(source)) for name in _COLUMN_NAMES}
    light = [columns["instruction"], columns["input_caption"], columns["output_caption"]]
    if "row_index" in names:
        light.append("row_index")
    # The text columns of every row first; images only of the rows drawn.
    table = dataset.to_table(columns=light)
    groups = table.column("row_index").to_pylist() if "row_index" in names else None
    chosen = _choose(table.num_rows, n, seed, groups)
    texts = table.take(chosen).to_pylist()
    images = dataset.to_table(columns=[columns["input_image"]]).take(chosen)
    rows = []
    for index, text, image in zip(chosen, texts, images.column(0).to_pylist(), strict=True):
        rows.append(
            EvalRow(
                image=_decode_image(image),
                instruction=text[columns["instruction"]],
                input_caption=text[columns["input_caption"]],
                output_caption=text[columns["output_caption"]],
                source=f"{source}#{index}",
            )
        )
    return rows


def _load_jsonl(source: Path, n: int | None, seed: int) -> list[EvalRow]:
    records = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}:{number}: not JSON: {exc}") from exc
    if not records:
        raise ValueError(f"{source}: no rows")
    names = sorted({key for record in records for key in record})
    columns = {name: _pick_column(names, name, str(source)) for name in _COLUMN_NAMES}
    groups = [record.get("row_index", index) for index, record in enumerate(records)]
    rows = []
    for index in _choose(len(records), n, seed, groups):
        record = records[index]
        missing = [name for name in columns.values() if not record.get(name)]
        if missing:
            raise ValueError(f"{source}:{index + 1}: empty or missing {', '.join(missing)}")
        rows.append(
            EvalRow(
                image=_decode_image(record[columns["input_image"]], source.parent),
                instruction=record[columns["instruction"]],
                input_caption=record[columns["input_caption"]],
                output_caption=record[columns["output_caption"]],
                source=f"{source}:{index + 1}",
            )
        )
    return rows


def load_eval_rows(source: str | Path, n: int | None = None, seed: int = 0) -> list[EvalRow]:
    """`n` rows (all when None) drawn with `seed` from a datagen Parquet export (a file or a
    folder of shards) or a JSONL file of rows (``.jsonl``/``.json`` lines)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {source} does not exist")
    if path.is_file() and path.suffix in (".jsonl", ".json", ".ndjson"):
        rows = _load_jsonl(path, n, seed)
    else:
        rows = _load_parquet(path, n, seed)
    bad = [row.source for row in rows if not (row.input_caption and row.output_caption)]
    if bad:
        raise ValueError(f"rows without both captions: {', '.join(bad[:5])}")
    if not rows:
        raise ValueError(f"dataset {source} has no rows")
    return rows


# -- metrics ------------------------------------------------------------------------------


def image_similarity(
    input_embeddings: torch.Tensor, output_embeddings: torch.Tensor
) -> torch.Tensor:
    """cos(E_img(input), E_img(output)) per row; embeddings (N, D) or (D,)."""
    return F.cosine_similarity(input_embeddings.float(), output_embeddings.float(), dim=-1)


def directional_similarity(
    input_images: torch.Tensor,
    output_images: torch.Tensor,
    input_texts: torch.Tensor,
    output_texts: torch.Tensor,
) -> torch.Tensor:
    """cos(E_img(out) - E_img(in), E_txt(out caption) - E_txt(in caption)) per row; 0 where
    either change is (numerically) zero, where no direction exists."""
    image_delta = output_images.float() - input_images.float()
    text_delta = output_texts.float() - input_texts.float()
    cosine = F.cosine_similarity(image_delta, text_delta, dim=-1, eps=ZERO_DELTA)
    defined = (image_delta.norm(dim=-1) > ZERO_DELTA) & (text_delta.norm(dim=-1) > ZERO_DELTA)
    return torch.where(defined, cosine, torch.zeros_like(cosine))


def score_edits(
    clip,
    inputs: Sequence[Image.Image],
    outputs: Sequence[Image.Image],
    input_captions: Sequence[str],
    output_captions: Sequence[str],
) -> dict[str, list[float]]:
    """Both similarities of each (input, output) pair of PIL images. `clip` is a
    ``services.datagen.clip_filter.ClipFilter`` (set up) or anything with its
    ``encode_images`` and ``encode_texts``."""
    if not (len(inputs) == len(outputs) == len(input_captions) == len(output_captions)):
        raise ValueError("inputs, outputs and captions differ in number")
    if not inputs:
        return {"image_similarity": [], "directional_similarity": []}
    images = clip.encode_images([*inputs, *outputs])
    image_in, image_out = images[: len(inputs)], images[len(inputs) :]
    captions = list(dict.fromkeys([*input_captions, *output_captions]))
    text = dict(zip(captions, clip.encode_texts(captions), strict=True))
    text_in = torch.stack([text[caption] for caption in input_captions])
    text_out = torch.stack([text[caption] for caption in output_captions])
    return {
        "image_similarity": image_similarity(image_in, image_out).tolist(),
        "directional_similarity": directional_similarity(
            image_in, image_out, text_in, text_out
        ).tolist(),
    }


def _load_clip(model: str, device: str):
    from services.datagen.clip_filter import ClipFilter, ClipFilterConfig

    clip = ClipFilter(ClipFilterConfig(model=model, device=device))
    clip.setup()
    return clip


# -- editing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    sweep: str  # "image_guidance" (S_I varies) or "text_guidance" (S_T varies)
    text_guidance: float
    image_guidance: float

    @property
    def scale(self) -> float:
        """The scale this sweep varies."""
        return self.image_guidance if self.sweep == "image_guidance" else self.text_guidance


def sweep_points(
    image_guidance: Sequence[float] = DEFAULT_IMAGE_GUIDANCE,
    fixed_text_guidance: float = DEFAULT_FIXED_TEXT_GUIDANCE,
    text_guidance: Sequence[float] = DEFAULT_TEXT_GUIDANCE,
    fixed_image_guidance: float = DEFAULT_FIXED_IMAGE_GUIDANCE,
) -> list[SweepPoint]:
    """The S_I sweep at fixed S_T, then the S_T sweep at fixed S_I (either may be empty)."""
    return [
        *(SweepPoint("image_guidance", fixed_text_guidance, s) for s in image_guidance),
        *(SweepPoint("text_guidance", s, fixed_image_guidance) for s in text_guidance),
    ]


@dataclass(frozen=True)
class EditCall:
    """One edit to make: a row's photo and instruction at a sweep point's scales."""

    image: Image.Image
    instruction: str
    text_guidance: float
    image_guidance: float
    seed: int
    steps: int


# Makes every call's edit, one output image per call, in order.
Editor = Callable[[Sequence[EditCall]], list[Image.Image]]


@dataclass(frozen=True)
class ModelSpec:
    model: str
    adapter: str | None = None

    @property
    def label(self) -> str:
        name = Path(self.model).name if Path(self.model).exists() else self.model
        if self.adapter:
            adapter = Path(self.adapter).name if Path(self.adapter).exists() else self.adapter
            return f"{name} + {adapter}"
        return name


def eval_adapter_id(adapter: str) -> str:
    """The adapter id (EditParams.adapter) a LoRA location runs under in the engine: one
    per location, so two adapters on one engine never share its adapter cache's slot."""
    return "eval-" + hashlib.sha256(adapter.encode()).hexdigest()[:16]


def load_engine(model: str, device: str = "auto", max_batch: int = 8):
    """The project's ``EditEngine`` for `model`, set up as a worker sets it up."""
    from services.gpu_worker.engine import EditEngine, EngineOptions

    engine = EditEngine(model, EngineOptions(device=device, max_batch=max_batch))
    engine.setup()
    return engine


def _engine_serves_adapters(engine) -> bool:
    from services.common.edit_params import EditParams

    return "adapter" in EditParams.model_fields and hasattr(engine, "set_adapter_resolver")


class EngineEditor:
    """Edits through ``EditEngine`` as the worker does: the photo resized to its
    resolution bucket (LANCZOS, as edit_job.py does), compatible calls batched together.

    `adapter` (a LoRA directory or Hub id): served the engine's own way, as the edit
    parameter ``adapter`` with a resolver that points its id at `adapter`
    (``adapter_mode`` "engine"), so one engine serves the base model and the adapter; an
    engine without adapter support gets it with ``pipe.load_lora_weights`` instead
    ("load_lora_weights", the LoRA then always on)."""

    def __init__(self, engine, adapter: str | None = None) -> None:
        self.engine = engine
        self.adapter = adapter
        self.adapter_mode: str | None = None
        self._adapter_id: str | None = None
        if adapter is None:
            return
        if _engine_serves_adapters(engine):
            from services.gpu_worker.adapters import AdapterUnavailable, ResolvedAdapter

            # Every adapter evaluated on this engine, by id (a model's specs share it).
            locations = engine.__dict__.setdefault("_eval_adapters", {})
            self._adapter_id = eval_adapter_id(adapter)
            locations[self._adapter_id] = adapter

            def resolve(adapter_id: str) -> ResolvedAdapter:
                if adapter_id not in locations:
                    raise AdapterUnavailable(adapter_id, "is not one this evaluation loaded")
                return ResolvedAdapter(Path(locations[adapter_id]))

            engine.set_adapter_resolver(resolve)
            self.adapter_mode = "engine"
        else:
            engine.pipe.load_lora_weights(adapter)
            self.adapter_mode = "load_lora_weights"
        log.info("LoRA %s on %s (%s)", adapter, engine.model_path, self.adapter_mode)

    def model_input(self, image: Image.Image) -> Image.Image:
        bucket = self.engine.bucket_for(*image.size)
        image = image.convert("RGB")
        return image if image.size == bucket else image.resize(bucket, Image.Resampling.LANCZOS)

    def __call__(self, calls: Sequence[EditCall]) -> list[Image.Image]:
        from services.common.edit_params import EditParams, batch_key
        from services.gpu_worker.engine import EditRequest

        requests = []
        for call in calls:
            params: dict[str, Any] = {
                "prompt": call.instruction,
                "guidance_scale": call.text_guidance,
                "image_guidance_scale": call.image_guidance,
                "seed": call.seed,
                "num_inference_steps": call.steps,
            }
            if self._adapter_id is not None:
                params["adapter"] = self._adapter_id
            requests.append(EditRequest(self.model_input(call.image), EditParams(**params)))
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(batch_key(request.image.size, request.params), []).append(index)
        outputs: list[Image.Image | None] = [None] * len(requests)
        for indices in groups.values():
            outcomes = self.engine.predict_batch([requests[i] for i in indices])
            for index, outcome in zip(indices, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    raise outcome
                outputs[index] = outcome[0]
        return outputs  # type: ignore[return-value]


class _EngineEditors:
    """The default editor factory: one engine per model, shared by a model's specs while
    the engine serves adapters itself (base vs fine-tuned loads the model once), a fresh
    one per spec otherwise; the previous model's engine is dropped before the next loads."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._engine = None
        self._model: str | None = None
        self._shareable = False

    def __call__(self, spec: ModelSpec) -> EngineEditor:
        if not (self._engine is not None and self._model == spec.model and self._shareable):
            self.close()
            self._engine = load_engine(spec.model, self.device)
            self._model = spec.model
            self._shareable = _engine_serves_adapters(self._engine)
        return EngineEditor(self._engine, spec.adapter)

    def close(self) -> None:
        self._engine = None
        self._model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- the evaluation -----------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def evaluate_model(
    editor: Editor,
    rows: Sequence[EvalRow],
    points: Sequence[SweepPoint],
    clip,
    *,
    steps: int = 20,
    seed: int = 0,
    chunk: int = 64,
    reference: Callable[[Image.Image], Image.Image] | None = None,
) -> list[dict[str, Any]]:
    """Per sweep point: its scales and the mean/std of both similarities over `rows`.

    Edits are submitted `chunk` at a time (several sweep points' edits share batches).
    `reference` maps a row's photo to the image the output is compared with (the engine's
    model input, at its resolution bucket); by default the photo itself."""
    # Each (S_T, S_I) once: the sweeps meet at (fixed S_T, fixed S_I), and a row's edit
    # at given scales is the same edit (same seed) in either sweep.
    scales = list(dict.fromkeys((p.text_guidance, p.image_guidance) for p in points))
    calls = [
        EditCall(row.image, row.instruction, text, image, seed + i, steps)
        for text, image in scales
        for i, row in enumerate(rows)
    ]
    edits: list[Image.Image] = []
    started = time.perf_counter()
    for start in range(0, len(calls), chunk):
        edits.extend(editor(calls[start : start + chunk]))
        log.info("edited %d/%d (%.0f s)", len(edits), len(calls), time.perf_counter() - started)
    by_scales = {
        pair: edits[number * len(rows) : (number + 1) * len(rows)]
        for number, pair in enumerate(scales)
    }
    inputs = [reference(row.image) if reference else row.image for row in rows]
    results = []
    for point in points:
        edited = by_scales[(point.text_guidance, point.image_guidance)]
        scores = score_edits(
            clip,
            inputs,
            edited,
            [row.input_caption for row in rows],
            [row.output_caption for row in rows],
        )
        image_mean, image_std = _mean_std(scores["image_similarity"])
        direction_mean, direction_std = _mean_std(scores["directional_similarity"])
        results.append(
            {
                "sweep": point.sweep,
                "scale": point.scale,
                "text_guidance": point.text_guidance,
                "image_guidance": point.image_guidance,
                "image_similarity": image_mean,
                "image_similarity_std": image_std,
                "directional_similarity": direction_mean,
                "directional_similarity_std": direction_std,
                "n": len(rows),
            }
        )
        log.info(
            "%s S_T=%g S_I=%g: image %.4f, directional %.4f",
            point.sweep,
            point.text_guidance,
            point.image_guidance,
            image_mean,
            direction_mean,
        )
    return results


def _sweeps(points: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        sweeps.setdefault(point["sweep"], []).append(point)
    return sweeps


_SWEEP_STYLE = {"image_guidance": ("-", "o", "S_I"), "text_guidance": ("--", "s", "S_T")}


def plot_tradeoff(models: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Figure 10's plot: x directional similarity, y image similarity, a line per sweep per
    model, each point labelled with the scale the sweep varies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, model in enumerate(models):
        color = colors[number % len(colors)]
        for sweep, points in model["sweeps"].items():
            linestyle, marker, symbol = _SWEEP_STYLE[sweep]
            fixed = model["fixed"][sweep]
            x = [p["directional_similarity"] for p in points]
            y = [p["image_similarity"] for p in points]
            other = "S_T" if sweep == "image_guidance" else "S_I"
            axes.plot(
                x,
                y,
                linestyle=linestyle,
                marker=marker,
                color=color,
                label=f"{model['label']}: {symbol} sweep ({other}={fixed:g})",
            )
            for p, px, py in zip(points, x, y, strict=True):
                axes.annotate(
                    f"{symbol}={p['scale']:g}",
                    (px, py),
                    textcoords="offset points",
                    # Below the S_T sweep's points: the sweeps share a point.
                    xytext=(4, 4) if sweep == "image_guidance" else (4, -10),
                    fontsize=7,
                    color=color,
                )
    axes.set_xlabel("CLIP text-image direction similarity")
    axes.set_ylabel("CLIP image similarity")
    axes.set_title("Edit consistency vs. edit strength (InstructPix2Pix Fig. 10)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return path


def run_evaluation(
    specs: Sequence[ModelSpec],
    rows: Sequence[EvalRow],
    points: Sequence[SweepPoint],
    clip,
    out: str | Path,
    *,
    steps: int = 20,
    seed: int = 0,
    device: str = "auto",
    editor_factory: Callable[[ModelSpec], Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate each model in turn (one loaded at a time); write metrics.json and
    tradeoff.png under `out` and return the metrics. `editor_factory(spec)` builds a
    model's editor (a callable from EditCalls to images; default: an ``EngineEditor``
    on the project's engine)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    engines = None if editor_factory is not None else _EngineEditors(device)
    factory = editor_factory or engines
    fixed = {
        "image_guidance": next(
            (p.text_guidance for p in points if p.sweep == "image_guidance"), None
        ),
        "text_guidance": next(
            (p.image_guidance for p in points if p.sweep == "text_guidance"), None
        ),
    }
    models = []
    for spec in specs:
        started = time.perf_counter()
        editor = factory(spec)
        reference = getattr(editor, "model_input", None)
        results = evaluate_model(
            editor, rows, points, clip, steps=steps, seed=seed, reference=reference
        )
        models.append(
            {
                "label": spec.label,
                "model": spec.model,
                "adapter": spec.adapter,
                "adapter_mode": getattr(editor, "adapter_mode", None),
                "fixed": {sweep: value for sweep, value in fixed.items() if value is not None},
                "sweeps": _sweeps(results),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    if engines is not None:
        engines.close()
    metrics = {
        **(meta or {}),
        "rows": len(rows),
        "steps": steps,
        "seed": seed,
        "models": models,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    plot_tradeoff(models, out / "tradeoff.png")
    return metrics


# -- command line -------------------------------------------------------------------------


def _scales(text: str) -> list[float]:
    if not text.strip():
        return []
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.gpu_worker.evaluate",
        description="InstructPix2Pix's CLIP evaluation (Fig. 10) of the served model.",
    )
    parser.add_argument("--model", required=True, help="pipeline directory or Hub id")
    parser.add_argument("--adapter", help="LoRA directory or Hub id on --model")
    parser.add_argument("--compare-model", help="a second model, plotted with the first")
    parser.add_argument("--compare-adapter", help="LoRA on --compare-model")
    parser.add_argument("--dataset", required=True, help="Parquet export (file/folder) or JSONL")
    parser.add_argument("--rows", type=int, default=100, help="rows to evaluate (default 100)")
    parser.add_argument("--clip-model", default="openai/clip-vit-large-patch14")
    parser.add_argument(
        "--image-guidance",
        type=_scales,
        default=list(DEFAULT_IMAGE_GUIDANCE),
        help="S_I sweep (comma-separated; empty for none)",
    )
    parser.add_argument("--fixed-text-guidance", type=float, default=DEFAULT_FIXED_TEXT_GUIDANCE)
    parser.add_argument(
        "--text-guidance",
        type=_scales,
        default=list(DEFAULT_TEXT_GUIDANCE),
        help="S_T sweep (comma-separated; empty for none)",
    )
    parser.add_argument("--fixed-image-guidance", type=float, default=DEFAULT_FIXED_IMAGE_GUIDANCE)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, type=Path)
    return parser


def main(argv: list[str] | None = None, editor_factory=None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.rows < 1:
        raise SystemExit("--rows must be >= 1")
    if args.compare_adapter and not args.compare_model:
        raise SystemExit("--compare-adapter needs --compare-model")
    points = sweep_points(
        args.image_guidance, args.fixed_text_guidance, args.text_guidance, args.fixed_image_guidance
    )
    if not points:
        raise SystemExit("both sweeps are empty")
    specs = [ModelSpec(args.model, args.adapter)]
    if args.compare_model:
        specs.append(ModelSpec(args.compare_model, args.compare_adapter))
    rows = load_eval_rows(args.dataset, args.rows, args.seed)
    log.info(
        "%d rows from %s, %d sweep points, %d model(s)",
        len(rows),
        args.dataset,
        len(points),
        len(specs),
    )
    clip = _load_clip(args.clip_model, args.device)
    metrics = run_evaluation(
        specs,
        rows,
        points,
        clip,
        args.out,
        steps=args.steps,
        seed=args.seed,
        device=args.device,
        editor_factory=editor_factory,
        meta={"dataset": str(args.dataset), "clip_model": args.clip_model},
    )
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'tradeoff.png'}")
    return metrics


if __name__ == "__main__":
    main()
