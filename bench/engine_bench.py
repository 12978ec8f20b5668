"""Edit engine benchmark: stock diffusers against our engine, on the same device.

    python -m bench.engine_bench                 # stock, ours eager and compiled (a GPU)
    python -m bench.engine_bench --tiny          # tiny model on CPU: a smoke run, not timed
    python -m bench.engine_bench --part PART --jsonl rows.jsonl   # one part (the GPU kit)
    python -m bench.engine_bench --host-overhead # the engine's own time per step, on CPU

Full size means the real InstructPix2Pix architecture built from its configs with random
weights (SD1.5 UNet with 8 input channels, CLIP ViT-L/14 text encoder, SD VAE): the same
compute as the released model, no download. 512x512, 20 steps, Euler ancestral.

Per configuration it reports ms per edit, edits/s, batch latency (median of --rounds),
peak GPU memory and MFU: 44.2 TFLOP per edit / time per edit / the device's peak, where
the peak is measured in the same process with a large fp16 matmul.

Parts (bench/gpu_session.sh runs each in a process of its own, with its own timeout):

- stock-eager: stock diffusers at batch 1, then our engine without torch.compile at
  --batches, on the same pipeline;
- compiled: our engine with torch.compile (--compile-mode) at --batches, in the order
  given; per row also the first call's time (compilation and the first run), the second
  call's (CUDA graph recording under reduce-overhead), dynamo's graph count, and the
  graphs and frames compiled during the timed rounds (recompiles after warm-up: 0 wanted);
- sync-debug: the engine with `sync_debug=True` (where EngineOptions has it), which runs
  its denoising loop under torch.cuda.set_sync_debug_mode("error"): `sync_free` is true
  when no step synchronised with the host, false with the error's text and place; then a
  census with mode "warn" over a whole predict_batch at --steps and twice as many steps,
  which counts the syncs and where they come from (those that grow with the steps are
  inside the loop);
- schedulers: batch 1, 20-step Euler ancestral next to 10-step DPM-Solver++ 2M (speed
  only: whether fewer steps look as good cannot be judged with random weights).

--host-overhead replaces the tiny model's UNet and VAE with shape-correct no-ops and
times what is left of a denoising step: the engine's own host work (batch assembly,
guidance, scheduler updates, callbacks), per step, at --batches; on a GPU this is time
the CPU spends launching work, which the GPU only hides if it is shorter than the UNet.

Every row is printed as a JSON line the moment it is measured, and appended (flushed) to
--jsonl when given, so a process killed by its timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.edit_params import EditParams  # noqa: E402
from services.common.tiny_components import build_euler_ancestral_scheduler  # noqa: E402
from services.gpu_worker.engine import EditEngine, EditRequest, EngineOptions  # noqa: E402

# Measured for the full-size model at 512x512 (DEVELOPERS.md): UNet 677 GFLOP per sample per
# forward, three guidance branches per step; VAE 1.08 TFLOP encode, 2.48 TFLOP decode.
UNET_TFLOP_PER_SAMPLE = 0.677
VAE_TFLOP = 1.08 + 2.48

PARTS = ("stock-eager", "compiled", "sync-debug", "schedulers")
# The schedulers part: (sampler, share of --steps). 20-step Euler ancestral is
# InstructPix2Pix's own; DPM-Solver++ 2M is commonly run at half the steps.
SCHEDULER_CASES = (("euler_ancestral", 1.0), ("dpmpp_2m", 0.5))


def edit_tflop(steps: int) -> float:
    return 3 * UNET_TFLOP_PER_SAMPLE * steps + VAE_TFLOP


@dataclass
class Result:
    config: str
    batch: int
    ms_per_edit: float
    edits_per_s: float
    latency_ms: float
    peak_mem_gb: float | None
    mfu: float | None
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        row = asdict(self)
        return {"kind": "result", **{k: v for k, v in row.items() if k != "extra"}, **self.extra}


class Rows:
    """Rows as JSON lines: printed, and appended to `path` at once (written, flushed and
    synced before the next measurement starts)."""

    def __init__(self, part: str, path: Path | None = None) -> None:
        self.part = part
        self.path = path
        self.rows: list[dict] = []

    def emit(self, row: dict) -> dict:
        row = {"part": self.part, **_rounded(row), "at": time.strftime("%H:%M:%S")}
        line = json.dumps(row, default=str)
        print(line, flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as out:
                out.write(line + "\n")
                out.flush()
                os.fsync(out.fileno())
        self.rows.append(row)
        return row


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


# -- building ------------------------------------------------------------------------------


def build_full_size_pipeline(device: torch.device):
    """InstructPix2Pix at full size with random weights (bench/full_size.py)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from bench.full_size import full_size_components

    return StableDiffusionInstructPix2PixPipeline(
        **full_size_components(8, device),
        scheduler=build_euler_ancestral_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_pipeline():
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from services.gpu_worker.tiny_model import write_tiny_instruct_pix2pix

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_instruct_pix2pix(tmp)
        return StableDiffusionInstructPix2PixPipeline.from_pretrained(tmp)


def engine_options(device: torch.device, **wanted) -> tuple[EngineOptions, list[str]]:
    """EngineOptions of those `wanted` options this engine has, and the names it lacks
    (the benchmark runs against the engine before and after an option is added)."""
    fields = EngineOptions.model_fields
    missing = sorted(name for name in wanted if name not in fields)
    given = {name: value for name, value in wanted.items() if name in fields}
    return EngineOptions(device=device.type, **given), missing


def measure_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    iters = 50
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def params_for(i: int, steps: int, scheduler: str | None = None) -> EditParams:
    prompts = ["make it red", "print a spiderman logo on it", "put the ball on sand"]
    extra = {"scheduler": scheduler} if scheduler else {}
    return EditParams(prompt=prompts[i % 3], seed=i, num_inference_steps=steps, **extra)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def bench_stock(pipe, image, steps, rounds, device) -> list[float]:
    """Stock diffusers: StableDiffusionInstructPix2PixPipeline.__call__, one at a time."""
    times = []
    for i in range(rounds):
        p = params_for(i, steps)
        times.append(
            _timed(
                lambda p=p: pipe(
                    p.prompt,
                    image=image,
                    num_inference_steps=steps,
                    generator=torch.Generator("cpu").manual_seed(p.seed),
                ),
                device,
            )
        )
    return times


def requests_for(image, steps, batch, first=0, scheduler=None) -> list[EditRequest]:
    return [EditRequest(image, params_for(first + i, steps, scheduler)) for i in range(batch)]


def bench_engine(engine, image, steps, batch, rounds, device, scheduler=None) -> list[float]:
    times = []
    for r in range(rounds):
        requests = requests_for(image, steps, batch, r * batch, scheduler)
        times.append(_timed(lambda requests=requests: engine.predict_batch(requests), device))
    return times


def summarize(config, batch, times, steps, device, peak_tflops, **extra) -> Result:
    per_batch = statistics.median(times)
    per_edit = per_batch / batch
    mfu = edit_tflop(steps) / per_edit / peak_tflops if peak_tflops else None
    return Result(
        config=config,
        batch=batch,
        ms_per_edit=per_edit * 1000,
        edits_per_s=1 / per_edit,
        latency_ms=per_batch * 1000,
        peak_mem_gb=_peak_gb(device),
        mfu=mfu,
        extra={
            "steps": steps,
            "rounds": len(times),
            "min_latency_ms": min(times) * 1000,
            "max_latency_ms": max(times) * 1000,
            **extra,
        },
    )


def _engine_source() -> str:
    """The commit of the engine benchmarked, '+dirty' when engine.py has changes."""
    try:
        git = ["git", "-C", str(ROOT)]
        sha = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "services/gpu_worker/engine.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def meta_row(args, device, dtype, **extra) -> dict:
    import diffusers
    import transformers

    from services.gpu_worker import engine as engine_module

    return {
        "kind": "meta",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "size": args.size,
        "steps": args.steps,
        "rounds": args.rounds,
        "model": "tiny" if args.tiny else "full-size InstructPix2Pix, random weights",
        "threads": torch.get_num_threads(),
        "engine_file": str(Path(engine_module.__file__).resolve()),
        "engine_source": _engine_source(),
        "engine_options": sorted(EngineOptions.model_fields),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


class Context:
    """What every part shares: the device, dtype, input image and the row writer."""

    def __init__(self, args, part: str) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.image = Image.new("RGB", (args.size, args.size), (90, 60, 200))
        self.rows = Rows(part, args.jsonl)
        self.peak: float | None = None
        self.results: list[Result] = []

    def pipeline(self):
        if self.args.tiny:
            return build_tiny_pipeline()
        return build_full_size_pipeline(self.device)

    def start(self, measure_peak: bool = True, **extra) -> dict:
        if measure_peak:
            self.peak = measure_peak_tflops(self.device)
        return self.rows.emit(
            meta_row(self.args, self.device, self.dtype, peak_tflops_fp16_matmul=self.peak, **extra)
        )

    def result(self, result: Result) -> Result:
        self.results.append(result)
        self.rows.emit(result.row())
        return result

    def engine(self, pipe, **options) -> tuple[EditEngine, list[str]]:
        opts, missing = engine_options(self.device, max_batch=max(self.args.batches), **options)
        engine = EditEngine("random-weights", opts)
        engine.use_pipeline(pipe)
        return engine, missing


# -- the parts -----------------------------------------------------------------------------


def part_stock_eager(ctx: Context, pipe=None, ours: bool = True) -> None:
    """Stock diffusers at batch 1, then our engine (no compile) at each batch size, on the
    same pipeline: building the 1B-parameter model once saves the kit ~10 s."""
    args, device = ctx.args, ctx.device
    pipe = pipe or ctx.pipeline()
    # Stock: the pipeline as diffusers ships it, fp16, default attention processors.
    pipe = pipe.to(device=device, dtype=ctx.dtype)
    pipe.set_progress_bar_config(disable=True)
    bench_stock(pipe, ctx.image, args.steps, 1, device)  # warm-up
    _reset_peak(device)
    times = bench_stock(pipe, ctx.image, args.steps, args.rounds, device)
    ctx.result(summarize("stock diffusers", 1, times, args.steps, device, ctx.peak))
    if not ours:
        return
    engine, _ = ctx.engine(pipe, compile_unet=False)
    for batch in args.batches:
        bench_engine(engine, ctx.image, args.steps, batch, 1, device)  # warm-up
        _reset_peak(device)
        times = bench_engine(engine, ctx.image, args.steps, batch, args.rounds, device)
        extra = {"attention": engine.info.attention, "compiled": False}
        ctx.result(summarize("ours", batch, times, args.steps, device, ctx.peak, **extra))
    del engine
    _reset_peak(device)


def dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "graphs": counters["stats"]["unique_graphs"],
        # dynamo converts a frame only when no compiled entry fits: every conversion
        # after the first of a frame is a recompile.
        "frames": counters["frames"]["total"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def part_compiled(ctx: Context, pipe=None) -> None:
    """Our engine with torch.compile, batch sizes in the order given (the most valuable
    first: a timeout loses the last)."""
    args, device = ctx.args, ctx.device
    start = time.perf_counter()
    engine, _ = ctx.engine(
        pipe or ctx.pipeline(), compile_unet=True, compile_mode=args.compile_mode
    )
    setup_s = time.perf_counter() - start
    label = "ours" + (f" + compile ({args.compile_mode})" if engine.info.compiled else "")
    for batch in args.batches:
        before = dynamo_counts()
        first = bench_engine(engine, ctx.image, args.steps, batch, 1, device)[0]
        second = bench_engine(engine, ctx.image, args.steps, batch, 1, device)[0]
        warm = dynamo_counts()
        # Written before the timed rounds: a part cut short by its timeout keeps these.
        ctx.rows.emit(
            {
                "kind": "compile",
                "batch": batch,
                "compile_mode": args.compile_mode,
                "setup_s": setup_s,
                "first_call_s": first,
                "second_call_s": second,
                "unique_graphs": warm["graphs"],
                "graphs_compiled_in_warmup": warm["graphs"] - before["graphs"],
                "graph_breaks": warm["graph_breaks"],
            }
        )
        _reset_peak(device)
        times = bench_engine(engine, ctx.image, args.steps, batch, args.rounds, device)
        after = dynamo_counts()
        ctx.result(
            summarize(
                label,
                batch,
                times,
                args.steps,
                device,
                ctx.peak,
                compiled=engine.info.compiled,
                compile_mode=args.compile_mode,
                attention=engine.info.attention,
                setup_s=setup_s,
                first_call_s=first,
                second_call_s=second,
                unique_graphs=after["graphs"],
                graphs_compiled_in_warmup=warm["graphs"] - before["graphs"],
                recompiles_after_warmup=after["frames"] - warm["frames"],
                new_graphs_after_warmup=after["graphs"] - warm["graphs"],
                graph_breaks=after["graph_breaks"],
            )
        )
    del engine
    _reset_peak(device)


def _sites(stack: list[traceback.FrameSummary]) -> tuple[str, str]:
    """(innermost frame in this project, innermost frame) of a stack, as path:line."""

    def name(frame: traceback.FrameSummary) -> str:
        path = Path(frame.filename)
        try:
            path = path.resolve().relative_to(ROOT)
        except ValueError:
            path = Path(*path.parts[-2:])
        return f"{path}:{frame.lineno}"

    ours = [f for f in stack if "/services/" in f.filename.replace(os.sep, "/")]
    return (name(ours[-1]) if ours else "?"), name(stack[-1])


def sync_census(engine, image, steps: int, batch: int) -> tuple[Counter, Counter]:
    """Every host-device synchronisation during one predict_batch (CUDA's sync debug mode
    "warn"), counted by (project frame, innermost frame)."""
    ours: Counter = Counter()
    inner: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            # Less this function and the warnings module's frames that called it.
            stack = traceback.extract_stack()[:-1]
            while stack and Path(stack[-1].filename).name in ("warnings.py", "_py_warnings.py"):
                stack.pop()
            site, deepest = _sites(stack)
            ours[site] += 1
            inner[deepest] += 1

    requests = requests_for(image, steps, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.predict_batch(requests)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return ours, inner


def _checked_call(engine, ctx: Context, batch: int, checked: bool) -> dict:
    """One predict_batch of the sync_debug engine: its seconds, or the error that ended it
    (a sync under mode "error", or a failure of its own) and where it was raised."""
    row: dict = {}
    try:
        requests = requests_for(ctx.image, ctx.args.steps, batch)
        row["seconds"] = _timed(lambda: engine.predict_batch(requests), ctx.device)
        if checked:
            row["sync_free"] = True
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        row["error"] = text[:2000]
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if "/services/" in f.filename.replace(os.sep, "/")]
        row["where"] = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in ours[-6:]]
        if frames:
            row["innermost"] = f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].name}"
        if "synchroniz" in text:
            row["sync_free"] = False
    return row


def part_sync_debug(ctx: Context, pipe=None) -> None:
    """Is the denoising loop free of host-device syncs? The engine's own check first
    (sync_debug=True: mode "error" around its loop), then a census of where syncs are."""
    args, device = ctx.args, ctx.device
    pipe = pipe or ctx.pipeline()
    cuda = device.type == "cuda"
    # Warm-up without the check, on the same pipeline: one-time work of a first call
    # (cuBLAS and cuDNN handles, the allocator's growth) is not what the check is about.
    plain, _ = ctx.engine(pipe, compile_unet=False)
    for batch in args.batches:
        plain.predict_batch(requests_for(ctx.image, 2, batch))
    engine, missing = ctx.engine(pipe, compile_unet=False, sync_debug=True)
    checked = cuda and not missing
    for batch in args.batches:
        for call in (1, 2):  # the first call of a batch size, and one after it
            row = {"kind": "sync_free", "batch": batch, "call": call, "steps": args.steps}
            row["sync_free"] = None
            if missing:
                row["note"] = (
                    "EngineOptions has no sync_debug: the engine before the sync-free step"
                )
            elif not cuda:
                row["note"] = "not on CUDA: sync debug mode is CUDA's; the loop ran unchecked"
            ctx.rows.emit({**row, **_checked_call(engine, ctx, batch, checked)})
    del engine
    if not cuda:
        ctx.rows.emit({"kind": "sync_census", "note": "not on CUDA: no census"})
        return
    for batch in args.batches:
        short, short_inner = sync_census(plain, ctx.image, args.steps, batch)
        long, long_inner = sync_census(plain, ctx.image, 2 * args.steps, batch)
        # What grows with the steps is inside the loop: syncs per step, by site.
        per_step = {
            site: (long[site] - short[site]) / args.steps
            for site in long
            if long[site] > short[site]
        }
        inner_per_step = {
            site: (long_inner[site] - short_inner[site]) / args.steps
            for site in long_inner
            if long_inner[site] > short_inner[site]
        }
        ctx.rows.emit(
            {
                "kind": "sync_census",
                "batch": batch,
                "steps": [args.steps, 2 * args.steps],
                "syncs": [sum(short.values()), sum(long.values())],
                "syncs_per_step": sum(per_step.values()),
                "per_step_sites": dict(sorted(per_step.items(), key=lambda kv: -kv[1])),
                "per_step_innermost": dict(
                    sorted(inner_per_step.items(), key=lambda kv: -kv[1])[:12]
                ),
                "outside_loop_sites": {s: n for s, n in short.items() if s not in per_step},
            }
        )


def part_schedulers(ctx: Context, pipe=None) -> None:
    """Batch-1 latency of 20-step Euler ancestral next to 10-step DPM-Solver++ 2M."""
    args, device = ctx.args, ctx.device
    engine, _ = ctx.engine(pipe or ctx.pipeline(), compile_unet=False)
    for scheduler, share in SCHEDULER_CASES:
        steps = max(1, round(args.steps * share))
        bench_engine(engine, ctx.image, steps, 1, 1, device, scheduler)  # warm-up
        _reset_peak(device)
        times = bench_engine(engine, ctx.image, steps, 1, args.rounds, device, scheduler)
        result = summarize(
            f"ours, {scheduler}",
            1,
            times,
            steps,
            device,
            ctx.peak,
            scheduler=scheduler,
            ms_per_step=statistics.median(times) * 1000 / steps,
            note="speed only: the quality of fewer steps needs the real weights",
        )
        ctx.result(result)


# -- host overhead -------------------------------------------------------------------------


class _NoOpLatents:
    """A VAE latent distribution whose every draw is the given latents."""

    def __init__(self, latents: torch.Tensor) -> None:
        self.mean = latents

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator=None) -> torch.Tensor:
        return self.mean


def make_noop(pipe) -> None:
    """Turn the pipeline's UNet and VAE into shape-correct no-ops, in place: the modules
    stay (config, dtype, device, everything the engine reads), their forward, encode and
    decode return zeros of the right shape. The UNet's output is its input's first
    channels times 0, so it still depends on the step's input as a real UNet's does."""
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    unet, vae = pipe.unet, pipe.vae
    out_channels = unet.config.out_channels
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_channels = vae.config.latent_channels

    def unet_forward(sample, timestep, encoder_hidden_states=None, *args, **kwargs):
        noise = sample[:, :out_channels] * 0
        return UNet2DConditionOutput(sample=noise) if kwargs.get("return_dict", True) else (noise,)

    def vae_encode(x, return_dict=True):
        b, _, h, w = x.shape
        latents = x.new_zeros(b, latent_channels, h // factor, w // factor)
        dist = _NoOpLatents(latents)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def vae_decode(z, return_dict=True, generator=None):
        b, _, h, w = z.shape
        pixels = z.new_zeros(b, 3, h * factor, w * factor)
        return DecoderOutput(sample=pixels) if return_dict else (pixels,)

    unet.forward = unet_forward
    vae.encode = vae_encode
    vae.decode = vae_decode


def _time_batch(engine, image, steps: int, batch: int, stamps: list | None = None) -> float:
    """One predict_batch's wall time; `stamps` gets the time of each of the first job's
    steps (its on_step callback)."""
    requests = requests_for(image, steps, batch)
    if stamps is not None:
        requests[0].on_step = lambda i, n: stamps.append(time.perf_counter())
    start = time.perf_counter()
    engine.predict_batch(requests)
    return time.perf_counter() - start


def host_overhead(args) -> list[dict]:
    """The engine's own time per denoising step: no-op UNet and VAE, tiny everything else,
    on CPU. A step's time is (median --steps-step batch - median 1-step batch) / (--steps
    - 1), which leaves out what happens once per batch (preparing prompts and images,
    decoding). Cross-check: the median interval between the first job's on_step calls."""
    # One thread measures the engine's own Python and dispatch cost; the caller's thread
    # count comes back afterwards (the tests run this in-process).
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _host_overhead(args)
    finally:
        torch.set_num_threads(threads)


def _host_overhead(args) -> list[dict]:
    rows = Rows("host-overhead", args.jsonl)
    pipe = build_tiny_pipeline()
    make_noop(pipe)
    options, _ = engine_options(torch.device("cpu"), max_batch=max(args.batches))
    engine = EditEngine("tiny, no-op UNet and VAE", options)
    engine.use_pipeline(pipe)
    size = engine.bucket_for(1, 1)
    args.size = size[0]
    rows.emit(
        meta_row(
            args,
            torch.device("cpu"),
            torch.float32,
            model="tiny, UNet and VAE no-ops",
            image=f"{size[0]}x{size[1]}",
            scheduler=str(params_for(0, 1).scheduler),
            method="(median of --steps-step batches - median of 1-step batches) / (steps-1)",
        )
    )
    image = Image.new("RGB", size, (90, 60, 200))
    long_steps = args.steps
    for batch in args.batches:
        for _ in range(2):  # warm-up: prompt cache, allocator, first-call paths
            _time_batch(engine, image, long_steps, batch)
            _time_batch(engine, image, 1, batch)
        long_times, short_times, intervals = [], [], []
        for _ in range(args.rounds):
            stamps: list[float] = []
            long_times.append(_time_batch(engine, image, long_steps, batch, stamps))
            if len(stamps) == long_steps:
                intervals += [b - a for a, b in itertools.pairwise(stamps)]
            short_times.append(_time_batch(engine, image, 1, batch))
        long_ms = statistics.median(long_times) * 1000
        short_ms = statistics.median(short_times) * 1000
        per_step = (long_ms - short_ms) / (long_steps - 1)
        rows.emit(
            {
                "kind": "host_overhead",
                "batch": batch,
                "steps": long_steps,
                "rounds": args.rounds,
                "ms_per_step": per_step,
                "us_per_step_per_job": per_step * 1000 / batch,
                "batch_ms": long_ms,
                "one_step_batch_ms": short_ms,
                "on_step_interval_ms": statistics.median(intervals) * 1000 if intervals else None,
                "target_ms_per_step_at_batch_8": 0.5,
            }
        )
    return rows.rows


def host_overhead_table(rows: list[dict]) -> str:
    lines = [
        "| batch | ms per step | us per step per job | 20-step batch ms | 1-step batch ms |"
        " on_step interval ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.get("kind") != "host_overhead":
            continue
        interval = r["on_step_interval_ms"]
        lines.append(
            f"| {r['batch']} | {r['ms_per_step']:.3f} | {r['us_per_step_per_job']:.0f} | "
            f"{r['batch_ms']:.1f} | {r['one_step_batch_ms']:.1f} | "
            f"{'n/a' if interval is None else f'{interval:.3f}'} |"
        )
    return "\n".join(lines)


# -- the command line ----------------------------------------------------------------------


def table(results: list[Result]) -> str:
    lines = [
        "| config | batch | ms/edit | edits/s | batch latency ms | peak GB | MFU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        peak = f"{r.peak_mem_gb:.2f}" if r.peak_mem_gb is not None else "n/a"
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        lines.append(
            f"| {r.config} | {r.batch} | {r.ms_per_edit:.1f} | {r.edits_per_s:.2f} | "
            f"{r.latency_ms:.1f} | {peak} | {mfu} |"
        )
    return "\n".join(lines)


PART_FUNCTIONS = {
    "stock-eager": part_stock_eager,
    "compiled": part_compiled,
    "sync-debug": part_sync_debug,
    "schedulers": part_schedulers,
}


def run(args) -> tuple[list[Result], dict]:
    """Without --part: stock, then ours with each --compile setting, in one process."""
    ctx = Context(args, "engine")
    meta = ctx.start(compile_mode=args.compile_mode)
    part_stock_eager(ctx, ours=False in args.compile)
    if True in args.compile:
        part_compiled(ctx)
    return ctx.results, meta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke run)")
    parser.add_argument("--part", choices=PARTS, help="run one part (see the module's doc)")
    parser.add_argument(
        "--host-overhead",
        action="store_true",
        help="the engine's own time per step with no-op UNet and VAE (tiny, CPU)",
    )
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for --host-overhead (default 1)"
    )
    parser.add_argument(
        "--compile",
        type=lambda v: v == "on",
        nargs="+",
        default=None,
        help="torch.compile settings to run without --part: on off",
    )
    parser.add_argument(
        "--compile-mode",
        default=EngineOptions.model_fields["compile_mode"].default,
        choices=["default", "reduce-overhead", "max-autotune"],
        help="torch.compile mode when compiling (default: the engine's)",
    )
    parser.add_argument("--json", type=Path, help="also write results here (one JSON object)")
    parser.add_argument(
        "--jsonl", type=Path, help="append every row here as a JSON line, as it is measured"
    )
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    if args.host_overhead:
        args.tiny = True
        args.rounds = args.rounds or 15
        args.batches = args.batches or [1, 4, 8]
        rows = host_overhead(args)
        print(host_overhead_table(rows))
        if args.json:
            args.json.write_text(json.dumps(rows))
        return rows
    args.size = args.size or (64 if args.tiny else 512)
    args.rounds = args.rounds or (1 if args.tiny else 5)
    if args.part == "sync-debug":
        args.batches = args.batches or [1, 8]
    args.batches = args.batches or [1, 4, 8]
    if args.part is None:
        if args.compile is None:
            args.compile = [False] if args.tiny else [False, True]
        results, meta = run(args)
    else:
        ctx = Context(args, args.part)
        meta = ctx.start(
            measure_peak=args.part != "sync-debug",
            compile_mode=args.compile_mode if args.part == "compiled" else None,
        )
        PART_FUNCTIONS[args.part](ctx)
        results = ctx.results
    print(json.dumps(meta))
    if results:
        print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": [r.row() for r in results]}))
    return results


if __name__ == "__main__":
    main()
