"""Fine-tune an InstructPix2Pix model (SD 1.5 or SDXL family) on an edit dataset: LoRA or full.

The objective is diffusers' examples/instruct_pix2pix/train_instruct_pix2pix.py: the
edited image's VAE latents (sampled, times the scaling factor) are noised at a random DDPM
timestep, and the UNet, given the noisy latents next to the input image's latents (the
distribution's mode, unscaled) and the prompt's text embedding, predicts the noise (or v).
Conditioning dropout drops the prompt, the image or both for classifier-free guidance.

SDXL follows examples/instruct_pix2pix/train_instruct_pix2pix_sdxl.py: the prompt embedding
is both text encoders' penultimate hidden states side by side, the UNet's added conditions
are text_encoder_2's pooled embedding and the time ids (original size, crop top-left,
target size: the bucket's (h, w, 0, 0, h, w)); conditioning dropout replaces both embeddings
by the empty prompt's. SDXL's VAE stays in float32 (it overflows in fp16). Text encoders are
not trained for SDXL.

Training runs under accelerate (`Accelerator(mixed_precision, gradient_accumulation)`), so
the same entry point runs on one device or data parallel under `accelerate launch`; the
BucketSampler shards batches by the accelerator's rank.

`run_finetune` is the entry point of the CLI (`python -m services.gpu_worker.finetune`)
and of a worker task: it resumes from DEST/checkpoints when there are any, writes
DEST/metrics.jsonl, validation renders to DEST/validation/step-N/, and the result to
DEST/adapter (diffusers' LoRA format) or DEST/pipeline (a complete pipeline directory).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from services.gpu_worker.finetune import checkpoint as ckpt
from services.gpu_worker.finetune.config import TEXT_ENCODER_TARGET_MODULES, FinetuneConfig

__all__ = [
    "FinetuneError",
    "FinetuneResult",
    "Progress",
    "ResumeRefused",
    "conditioning_dropout_masks",
    "run_finetune",
]

log = logging.getLogger(__name__)

SD15_PIPELINE = "StableDiffusionInstructPix2PixPipeline"
SDXL_PIPELINE = "StableDiffusionXLInstructPix2PixPipeline"
HINT = "Give --base a Hub id or a local directory of an InstructPix2Pix diffusers pipeline."


class FinetuneError(RuntimeError):
    """A fine-tuning run cannot start; the message says why and what to do."""


class ResumeRefused(FinetuneError):
    """DEST holds checkpoints of a run whose config differs in a way that matters."""


@dataclass(frozen=True)
class Progress:
    step: int
    max_steps: int
    loss: float
    lr: float
    images_per_s: float
    eta_s: float
    peak_memory_mb: float


@dataclass(frozen=True)
class FinetuneResult:
    dest: Path
    mode: str
    steps: int
    final_loss: float | None
    stopped: bool
    resumed_from: int | None
    adapter_dir: Path | None
    pipeline_dir: Path | None
    metrics_path: Path


def conditioning_dropout_masks(
    random_p: torch.Tensor, prob: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' train_instruct_pix2pix masks from per-sample uniforms `random_p`:
    (prompt_mask: True where the prompt is replaced by the empty prompt's embedding,
    image_mask: 0.0 where the input image latents are zeroed, else 1.0).

    p < prob: prompt only; prob <= p < 2 prob: both; 2 prob <= p < 3 prob: image only."""
    prompt_mask = random_p < 2 * prob
    image_mask = 1 - ((random_p >= prob).float() * (random_p < 3 * prob).float())
    return prompt_mask, image_mask


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _resolve_base(base: str) -> tuple[Path, bool]:
    """The pipeline directory of `base` and whether it is SDXL InstructPix2Pix."""
    from services.common.diffusion import (
        ModelUnavailable,
        pipeline_class_name,
        resolve_pipeline_dir,
    )

    try:
        directory = resolve_pipeline_dir(base, HINT)
        name = pipeline_class_name(directory)
    except ModelUnavailable as exc:
        raise FinetuneError(str(exc)) from exc
    if name not in (SD15_PIPELINE, SDXL_PIPELINE):
        raise FinetuneError(f"{base} is a {name}, not an InstructPix2Pix pipeline. {HINT}")
    return directory, name == SDXL_PIPELINE


def _check_text_encoder_lora() -> None:
    """A text-encoder LoRA goes through transformers' PEFT integration (training, and
    `load_lora_weights` later), which has its own minimum PEFT version."""
    import peft
    from packaging.version import Version
    from transformers.integrations.peft import MIN_PEFT_VERSION

    if Version(peft.__version__) < Version(MIN_PEFT_VERSION):
        raise FinetuneError(
            f"train_text_encoder in lora mode needs peft>={MIN_PEFT_VERSION} (transformers' "
            f"PEFT integration; installed: peft {peft.__version__}); train the UNet's LoRA "
            f"only, or use mode='full'"
        )


def _forget_accelerator_settings() -> None:
    """accelerate keeps one AcceleratorState and GradientState per process, and refuses a
    second Accelerator with other settings (mixed precision, accumulation). A worker runs
    one fine-tune after another, each with its own: forget the previous run's. The
    PartialState (the process group of a launched run) stays."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _mixed_precision(config: FinetuneConfig) -> str:
    if config.mixed_precision is not None:
        return config.mixed_precision
    return "bf16" if torch.cuda.is_available() else "no"


def _optimizer(config: FinetuneConfig, params: list, device: torch.device):
    lr = config.effective_learning_rate
    if config.use_8bit_adam and device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=config.adam_weight_decay)
        except ImportError:
            log.info("bitsandbytes does not import: AdamW instead of 8-bit AdamW")
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.adam_weight_decay)


def _lr_scheduler(config: FinetuneConfig, optimizer):
    from diffusers.optimization import get_scheduler

    name = config.lr_scheduler
    if name == "constant" and config.lr_warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_steps,
    )


class _Trainer:
    def __init__(
        self,
        config: FinetuneConfig,
        dataset_source: str,
        base: str,
        dest: Path,
        metrics_registry=None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from services.gpu_worker.finetune.data import (
            BucketSampler,
            EditBatches,
            load_edit_dataset,
            split_holdout,
        )

        self.config = config
        self.dataset_source = dataset_source
        self.base = base
        self.dest = dest
        self.base_dir, self.sdxl = _resolve_base(base)
        if self.sdxl and config.train_text_encoder:
            raise FinetuneError(
                f"{base} is an SDXL InstructPix2Pix pipeline: train_text_encoder is supported "
                f"for the SD 1.5 family only; train the UNet alone"
            )
        _forget_accelerator_settings()
        self.accelerator = accel = Accelerator(
            mixed_precision=_mixed_precision(config),
            gradient_accumulation_steps=config.gradient_accumulation,
            # Without CUDA, processes started by torchrun or `accelerate launch
            # --multi_gpu` train data parallel on the CPU (gloo) instead of alone.
            cpu=not torch.cuda.is_available(),
        )
        self.device = accel.device
        self.rank, self.world = accel.process_index, accel.num_processes
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            accel.mixed_precision, torch.float32
        )
        set_seed(config.seed)  # LoRA's initial weights

        d = self.base_dir
        self.tokenizer = CLIPTokenizer.from_pretrained(d, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(d, subfolder="text_encoder")
        self.tokenizer_2 = self.text_encoder_2 = None
        if self.sdxl:
            self.tokenizer_2 = CLIPTokenizer.from_pretrained(d, subfolder="tokenizer_2")
            self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                d, subfolder="text_encoder_2"
            )
            self.text_encoder_2.requires_grad_(False)
        self.vae = AutoencoderKL.from_pretrained(d, subfolder="vae")
        self.unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet")
        self.noise_scheduler = DDPMScheduler.from_pretrained(d, subfolder="scheduler")
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = config.resolution or self.unet.config.sample_size * self.vae_scale

        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.unet.requires_grad_(False)
        self.train_text = config.train_text_encoder
        if config.mode == "lora":
            from peft import LoraConfig

            self.unet.add_adapter(
                LoraConfig(
                    r=config.rank,
                    lora_alpha=config.alpha,
                    lora_dropout=config.lora_dropout,
                    init_lora_weights="gaussian",
                    target_modules=config.lora_target_modules,
                )
            )
            if self.train_text:
                _check_text_encoder_lora()
                self.text_encoder.add_adapter(
                    LoraConfig(
                        r=config.rank,
                        lora_alpha=config.alpha,
                        lora_dropout=config.lora_dropout,
                        init_lora_weights="gaussian",
                        target_modules=list(TEXT_ENCODER_TARGET_MODULES),
                    )
                )
        else:
            self.unet.requires_grad_(True)
            self.text_encoder.requires_grad_(self.train_text)

        # Frozen weights in the autocast dtype; trained weights stay float32.
        half = self.weight_dtype != torch.float32
        frozen = {"dtype": self.weight_dtype} if half else {}
        # SDXL's VAE overflows in fp16: it stays float32 (diffusers' SDXL script does too).
        self.vae_dtype = torch.float32 if self.sdxl else self.weight_dtype
        self.vae.to(self.device, **({"dtype": self.vae_dtype} if half or self.sdxl else {}))
        if self.text_encoder_2 is not None:
            self.text_encoder_2.to(self.device, **frozen)
        if config.mode == "lora":
            self.unet.to(self.device, **frozen)
            self.text_encoder.to(self.device, **frozen)
            if half:
                from diffusers.training_utils import cast_training_params

                cast_training_params([self.unet, self.text_encoder], dtype=torch.float32)
        else:
            self.unet.to(self.device)
            self.text_encoder.to(self.device, **({} if self.train_text else frozen))
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.train_text:
                encoder = self.text_encoder  # transformers 5 renamed the method
                getattr(
                    encoder,
                    "activation_checkpointing_enable",
                    encoder.gradient_checkpointing_enable,
                )()

        self.ema = None
        if config.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(
                self.unet.parameters(),
                decay=config.ema_decay,
                model_cls=UNet2DConditionModel,
                model_config=self.unet.config,
            )
            self.ema.to(self.device)

        self.trained = {"unet": self.unet}
        if self.train_text:
            self.trained["text_encoder"] = self.text_encoder
        params = [p for m in self.trained.values() for p in m.parameters() if p.requires_grad]
        self.params = params
        optimizer = _optimizer(config, params, self.device)
        self.lr_scheduler = _lr_scheduler(config, optimizer)

        # Data: hold-out rows for validation, the rest in buckets sharded by rank.
        dataset = load_edit_dataset(dataset_source)
        train_idx, holdout_idx = split_holdout(dataset, config.holdout_rows, config.seed)
        if not train_idx:
            raise FinetuneError(
                f"{dataset_source} has {len(dataset)} rows, all held out "
                f"(holdout_rows={config.holdout_rows})"
            )
        self.train_set = dataset.subset(train_idx)
        self.holdout = dataset.subset(holdout_idx)
        sampler = BucketSampler(
            self.train_set.sizes(),
            self.resolution,
            config.batch_size,
            config.seed,
            world_size=self.world,
            rank=self.rank,
        )
        self.batches = EditBatches(self.train_set, sampler, flip_seed=config.seed + self.rank)

        models = list(self.trained.values())
        prepared = accel.prepare(*models, optimizer)
        self.optimizer = prepared[-1]
        self.prepared = dict(zip(self.trained, prepared[:-1], strict=True))

        # Noise, timesteps, latent samples and dropout come from this generator (per rank).
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed * 1_000_003 + self.rank)
        self.null_ids = self._tokenize([""])
        if self.sdxl:  # the frozen encoders' embeddings of the empty prompt
            self.null_sdxl = self._encode_sdxl([""])
        self.step = 0
        self.resumed_from: int | None = None
        self.metrics_registry = metrics_registry
        self._gauges = None
        if metrics_registry is not None and accel.is_main_process:
            from prometheus_client import Gauge

            self._gauges = (
                # "livemostrecent": on the worker's multiprocess /metrics, a dead pool
                # child's series go with it.
                Gauge(
                    "instructedit_finetune_step",
                    "Fine-tuning step",
                    registry=metrics_registry,
                    multiprocess_mode="livemostrecent",
                ),
                Gauge(
                    "instructedit_finetune_loss",
                    "Fine-tuning loss",
                    registry=metrics_registry,
                    multiprocess_mode="livemostrecent",
                ),
            )

    # -- the objective --------------------------------------------------------------

    def _tokenize(self, prompts: list[str], tokenizer=None) -> torch.Tensor:
        tokenizer = tokenizer or self.tokenizer
        return tokenizer(
            prompts,
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def _encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        encoder = self.prepared.get("text_encoder", self.text_encoder)
        if self.train_text:
            return encoder(ids)[0]
        with torch.no_grad():
            return encoder(ids)[0]

    @torch.no_grad()
    def _encode_sdxl(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's (prompt embeds, pooled embeds): both (frozen) encoders' penultimate hidden
        states concatenated, and text_encoder_2's projected pooled output."""
        hidden = []
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            output = encoder(self._tokenize(prompts, tokenizer), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        pooled = output[0]  # text_encoder_2's text_embeds
        return torch.cat(hidden, dim=-1), pooled

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        gen = self.generator
        edited = batch["edited_pixel_values"].to(self.device, self.vae_dtype)
        original = batch["original_pixel_values"].to(self.device, self.vae_dtype)
        with torch.no_grad():
            latents = self.vae.encode(edited).latent_dist.sample(generator=gen)
            latents = (latents * self.vae.config.scaling_factor).to(self.weight_dtype)
            original_embeds = self.vae.encode(original).latent_dist.mode().to(self.weight_dtype)
        bsz = latents.shape[0]
        noise = torch.randn(latents.shape, generator=gen, device=self.device, dtype=latents.dtype)
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (bsz,),
            generator=gen,
            device=self.device,
        ).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        unet_kwargs = {}
        if self.sdxl:
            hidden, pooled = self._encode_sdxl(batch["prompts"])
        else:
            hidden = self._encode_text(self._tokenize(batch["prompts"]))
        prob = self.config.conditioning_dropout_prob
        if prob > 0:
            random_p = torch.rand(bsz, device=self.device, generator=gen)
            prompt_mask, image_mask = conditioning_dropout_masks(random_p, prob)
            if self.sdxl:
                null, null_pooled = self.null_sdxl
                pooled = torch.where(
                    prompt_mask.reshape(bsz, 1), null_pooled.to(pooled.dtype), pooled
                )
            else:
                null = self._encode_text(self.null_ids)
            hidden = torch.where(prompt_mask.reshape(bsz, 1, 1), null.to(hidden.dtype), hidden)
            image_mask = image_mask.to(original_embeds.dtype).reshape(bsz, 1, 1, 1)
            original_embeds = image_mask * original_embeds
        model_input = torch.cat([noisy, original_embeds], dim=1)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise FinetuneError(f"unknown prediction type {prediction_type!r}")
        if self.sdxl:
            # original_size + crops_coords_top_left + target_size: the bucket, uncropped.
            h, w = edited.shape[-2:]
            time_ids = torch.tensor([h, w, 0, 0, h, w], device=self.device, dtype=hidden.dtype)
            unet_kwargs["added_cond_kwargs"] = {
                "text_embeds": pooled,
                "time_ids": time_ids.repeat(bsz, 1),
            }
        pred = self.prepared["unet"](model_input, timesteps, hidden, **unet_kwargs).sample
        return F.mse_loss(pred.float(), target.float(), reduction="mean")

    def train_step(self) -> float:
        accel = self.accelerator
        total = 0.0
        models = list(self.prepared.values())
        for model in models:
            model.train()
        for _ in range(self.config.gradient_accumulation):
            batch = next(self.batches)
            with accel.accumulate(*models):
                loss = self.loss(batch)
                accel.backward(loss)
                if accel.sync_gradients:
                    accel.clip_grad_norm_(self.params, self.config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            gathered = accel.gather(loss.detach().reshape(1)).mean()
            total += gathered.item() / self.config.gradient_accumulation
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.unet.parameters())
        self.step += 1
        return total

    # -- checkpoints ----------------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for prefix, model in self.trained.items():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    state[f"{prefix}.{name}"] = param
        return state

    def _state_header(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": self.config.model_dump(mode="json"),
            "dataset": self.dataset_source,
            "base": self.base,
            "world_size": self.world,
        }

    def save_checkpoint(self) -> Path | None:
        accel = self.accelerator
        temp = self.dest / ckpt.CHECKPOINTS / f"{ckpt.TEMP_PREFIX}{self.step}"
        if accel.is_main_process:
            temp = ckpt.temp_dir(self.dest, self.step)
        accel.wait_for_everyone()
        torch.save(
            {"rng": ckpt.rng_state(self.generator), "data": self.batches.state_dict()},
            ckpt.rank_file(temp, self.rank),
        )
        final = None
        if accel.is_main_process:
            ckpt.write_weights(temp, self._trainable_state())
            training = {
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
            }
            if self.ema is not None:
                training["ema"] = self.ema.state_dict()
            if accel.scaler is not None:
                training["scaler"] = accel.scaler.state_dict()
            ckpt.write_training(temp, training)
        accel.wait_for_everyone()
        if accel.is_main_process:
            ckpt.write_state(temp, self._state_header())  # last: marks it complete
            ckpt.fsync_dir(temp)
            final = ckpt.commit(temp, self.dest, self.step)
            ckpt.prune_checkpoints(self.dest, self.config.keep_checkpoints)
            log.info("checkpoint saved: %s", final)
        accel.wait_for_everyone()
        return final

    def maybe_resume(self) -> None:
        directory = ckpt.latest_checkpoint(self.dest)
        if directory is None:
            return
        state = ckpt.read_state(directory)
        saved = FinetuneConfig.model_validate(state["config"])
        problems = self.config.resume_mismatches(saved)
        if state["dataset"] != self.dataset_source:
            problems.append(
                f"dataset: checkpoint {state['dataset']!r}, now {self.dataset_source!r}"
            )
        if state["base"] != self.base:
            problems.append(f"base: checkpoint {state['base']!r}, now {self.base!r}")
        if state.get("world_size", 1) != self.world:
            problems.append(f"processes: checkpoint {state.get('world_size', 1)}, now {self.world}")
        if problems:
            raise ResumeRefused(
                f"{self.dest} holds checkpoints of a different run ({'; '.join(problems)}); "
                f"give another --out, or delete {self.dest / ckpt.CHECKPOINTS} to start over"
            )
        weights = ckpt.read_weights(directory)
        params = self._trainable_state()
        missing = sorted(set(params) ^ set(weights))
        if missing:
            raise ResumeRefused(f"checkpoint {directory} does not match the model: {missing[:5]}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name].to(param.device, param.dtype))
        training = ckpt.read_training(directory)
        self.optimizer.load_state_dict(training["optimizer"])
        self.lr_scheduler.load_state_dict(training["lr_scheduler"])
        if self.ema is not None and "ema" in training:
            self.ema.load_state_dict(training["ema"])
            self.ema.to(self.device)
        if self.accelerator.scaler is not None and "scaler" in training:
            self.accelerator.scaler.load_state_dict(training["scaler"])
        per_rank = torch.load(
            ckpt.rank_file(directory, self.rank), map_location="cpu", weights_only=False
        )
        ckpt.load_rng_state(per_rank["rng"], self.generator)
        self.batches.load_state_dict(per_rank["data"])
        self.step = int(state["step"])
        self.resumed_from = self.step
        if saved != self.config:
            log.warning("resuming with a changed config (fields that do not change the weights)")
        log.info("resumed from %s (step %d)", directory, self.step)

    # -- outputs --------------------------------------------------------------------

    def _pipeline(self):
        from diffusers import (
            StableDiffusionInstructPix2PixPipeline,
            StableDiffusionXLInstructPix2PixPipeline,
            schedulers,
        )

        config = json.loads((self.base_dir / "scheduler" / "scheduler_config.json").read_text())
        scheduler = getattr(schedulers, config["_class_name"]).from_config(config)
        if self.sdxl:
            # The base's pipeline options (force_zeros_for_empty_prompt, is_cosxl_edit...)
            # with these components: from_pretrained loads none that are given.
            return StableDiffusionXLInstructPix2PixPipeline.from_pretrained(
                self.base_dir,
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.accelerator.unwrap_model(self.unet),
                scheduler=scheduler,
            )
        return StableDiffusionInstructPix2PixPipeline(
            vae=self.vae,
            text_encoder=self.accelerator.unwrap_model(self.text_encoder),
            tokenizer=self.tokenizer,
            unet=self.accelerator.unwrap_model(self.unet),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def validate(self) -> Path | None:
        """Render the first `validation_rows` held-out rows with the model as it stands."""
        n = min(self.config.validation_rows, len(self.holdout))
        if n == 0 or not self.accelerator.is_main_process:
            return None
        from services.common.buckets import bucket_for

        out = self.dest / "validation" / f"step-{self.step}"
        out.mkdir(parents=True, exist_ok=True)
        pipe = self._pipeline()
        pipe.set_progress_bar_config(disable=True)
        for model in self.trained.values():
            model.eval()
        if self.ema is not None:
            self.ema.store(self.unet.parameters())
            self.ema.copy_to(self.unet.parameters())
        try:
            with torch.random.fork_rng(devices=[]), self.accelerator.autocast():
                for i in range(n):
                    row = self.holdout.row(i)
                    size = bucket_for(*row.input.size, self.resolution)
                    generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
                    # SDXL's pipeline renders at its default size unless told the image's.
                    sized = {"width": size[0], "height": size[1]} if self.sdxl else {}
                    image = pipe(
                        row.prompt,
                        image=row.input.resize(size),
                        num_inference_steps=self.config.validation_inference_steps,
                        generator=generator,
                        **sized,
                    ).images[0]
                    image.save(out / f"{i:03d}.png")
                    (out / f"{i:03d}.txt").write_text(row.prompt + "\n")
        finally:
            if self.ema is not None:
                self.ema.restore(self.unet.parameters())
        return out

    def export(self) -> tuple[Path | None, Path | None]:
        from diffusers import (
            StableDiffusionInstructPix2PixPipeline,
            StableDiffusionXLInstructPix2PixPipeline,
        )

        if not self.accelerator.is_main_process:
            return None, None
        unet = self.accelerator.unwrap_model(self.unet)
        text_encoder = self.accelerator.unwrap_model(self.text_encoder)
        if self.config.mode == "lora":
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            adapter = self.dest / "adapter"
            text_layers = None
            if self.train_text:
                text_layers = convert_state_dict_to_diffusers(
                    get_peft_model_state_dict(text_encoder)
                )
            if self.sdxl:  # the UNet's layers only: SDXL's text encoders are not trained
                StableDiffusionXLInstructPix2PixPipeline.save_lora_weights(
                    adapter,
                    unet_lora_layers=convert_state_dict_to_diffusers(
                        get_peft_model_state_dict(unet)
                    ),
                    safe_serialization=True,
                )
                return adapter, None
            StableDiffusionInstructPix2PixPipeline.save_lora_weights(
                adapter,
                unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
                text_encoder_lora_layers=text_layers,
                safe_serialization=True,
            )
            return adapter, None
        if self.ema is not None:
            self.ema.store(unet.parameters())
            self.ema.copy_to(unet.parameters())
        try:
            pipe = self._pipeline()
            if self.weight_dtype != torch.float32:
                pipe.to(dtype=torch.float32)
            target = self.dest / "pipeline"
            pipe.save_pretrained(target)
        finally:
            if self.ema is not None:
                self.ema.restore(unet.parameters())
        return None, target


def run_finetune(
    config: FinetuneConfig,
    dataset_source: str,
    base: str,
    dest: str | Path,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    metrics=None,
) -> FinetuneResult:
    """Fine-tune `base` on `dataset_source` into `dest`, resuming from dest's checkpoints.

    on_progress: called after every step (main process) with a `Progress`.
    should_stop: checked after every step; when it returns True the run checkpoints and
        returns with `stopped=True` (run it again to continue).
    metrics: a prometheus_client CollectorRegistry for step and loss gauges.
    """
    if "://" in str(dest):
        raise FinetuneError(f"--out must be a local directory for now, not {dest}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    trainer = _Trainer(config, dataset_source, base, dest, metrics)
    accel = trainer.accelerator
    trainer.maybe_resume()
    metrics_path = dest / "metrics.jsonl"
    images_per_step = config.batch_size * config.gradient_accumulation * trainer.world
    if accel.is_main_process:
        log.info(
            "fine-tuning (%s) %s on %s: %d train rows, %d held out, resolution %d, "
            "%d process(es), %s precision, step %d of %d",
            config.mode,
            base,
            dataset_source,
            len(trainer.train_set),
            len(trainer.holdout),
            trainer.resolution,
            trainer.world,
            accel.mixed_precision,
            trainer.step,
            config.max_steps,
        )
    loss = None
    stopped = False
    saved_at = trainer.step
    step_time = None
    while trainer.step < config.max_steps:
        started = time.perf_counter()
        loss = trainer.train_step()
        elapsed = time.perf_counter() - started
        step_time = elapsed if step_time is None else 0.9 * step_time + 0.1 * elapsed
        step = trainer.step
        if accel.is_main_process:
            progress = Progress(
                step=step,
                max_steps=config.max_steps,
                loss=loss,
                lr=trainer.lr_scheduler.get_last_lr()[0],
                images_per_s=images_per_step / elapsed if elapsed > 0 else math.inf,
                eta_s=step_time * (config.max_steps - step),
                peak_memory_mb=_peak_memory_mb(trainer.device),
            )
            with metrics_path.open("a") as f:
                record = {k: v for k, v in asdict(progress).items() if k != "max_steps"}
                f.write(json.dumps(record) + "\n")
            if trainer._gauges is not None:
                trainer._gauges[0].set(step)
                trainer._gauges[1].set(loss)
            if step % config.log_every == 0 or step == config.max_steps:
                log.info(
                    "step %d/%d loss %.5f lr %.3g %.2f images/s ETA %s peak %.0f MB",
                    step,
                    config.max_steps,
                    loss,
                    progress.lr,
                    progress.images_per_s,
                    _eta(progress.eta_s),
                    progress.peak_memory_mb,
                )
            if on_progress is not None:
                on_progress(progress)
        if step % config.checkpoint_every == 0:
            trainer.save_checkpoint()
            saved_at = step
        if config.validation_every and step % config.validation_every == 0:
            trainer.validate()
            accel.wait_for_everyone()
        if should_stop is not None and _all_agree_to_stop(accel, should_stop()):
            if saved_at != step:
                trainer.save_checkpoint()
                saved_at = step
            stopped = True
            break
    if not stopped and saved_at != trainer.step:
        trainer.save_checkpoint()
    adapter_dir = pipeline_dir = None
    if not stopped:
        adapter_dir, pipeline_dir = trainer.export()
        if accel.is_main_process:
            summary = {
                "config": config.model_dump(mode="json"),
                "base": base,
                "dataset": dataset_source,
                "steps": trainer.step,
                "final_loss": loss,
                "adapter": str(adapter_dir) if adapter_dir else None,
                "pipeline": str(pipeline_dir) if pipeline_dir else None,
            }
            (dest / "finetune.json").write_text(json.dumps(summary, indent=2))
    accel.wait_for_everyone()
    accel.end_training()
    return FinetuneResult(
        dest=dest,
        mode=config.mode,
        steps=trainer.step,
        final_loss=loss,
        stopped=stopped,
        resumed_from=trainer.resumed_from,
        adapter_dir=adapter_dir,
        pipeline_dir=pipeline_dir,
        metrics_path=metrics_path,
    )


def _all_agree_to_stop(accel, stop: bool) -> bool:
    if accel.num_processes == 1:
        return bool(stop)
    flag = torch.tensor([1.0 if stop else 0.0], device=accel.device)
    return bool(accel.reduce(flag, reduction="sum").item() > 0)


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"
