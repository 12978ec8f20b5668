"""The hyper-parameters of a fine-tuning run: one pydantic model, `FinetuneConfig`.

The CLI (`python -m services.gpu_worker.finetune`) builds its options from these fields,
checkpoints store it, and the API validates POST /v1/finetunes bodies with it, so this file
imports neither torch nor diffusers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_TARGET_MODULES",
    "RESUME_FIELDS",
    "FinetuneConfig",
]

# Attention projections of the UNet's transformer blocks: what LoRA adapts by default.
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
# ResNet convolutions, added to the targets by `lora_conv`.
CONV_TARGET_MODULES = ("conv1", "conv2", "conv_shortcut")
# CLIP text encoder's attention projections, adapted when `train_text_encoder` (LoRA mode).
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
DEFAULT_LEARNING_RATE = {"lora": 1e-4, "full": 5e-6}

# Fields a resumed run must share with its checkpoint: they change what the trained
# weights are (their shapes, which modules, the data they are fitted to).
RESUME_FIELDS = (
    "mode",
    "rank",
    "alpha",
    "target_modules",
    "lora_conv",
    "train_text_encoder",
    "ema",
    "resolution",
    "holdout_rows",
    "seed",
)


class FinetuneConfig(BaseModel):
    """How to fine-tune an InstructPix2Pix model on a product edit dataset."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["lora", "full"] = Field(
        "lora",
        description="lora: train a low-rank adapter on the UNet (small, fast, the default); "
        "full: train every UNet weight (a complete pipeline comes out).",
    )
    rank: int = Field(16, ge=1, le=256, description="LoRA rank (lora mode).")
    alpha: float = Field(
        16.0, gt=0, le=1024, description="LoRA alpha; the adapter is scaled by alpha/rank."
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the LoRA layers.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        description="UNet module names LoRA adapts (lora mode).",
    )
    lora_conv: bool = Field(
        False, description="Also adapt the ResNet convolutions (conv1, conv2, conv_shortcut)."
    )
    train_text_encoder: bool = Field(
        False,
        description="Also train the text encoder (a LoRA on its attention in lora mode, "
        "every weight in full mode).",
    )
    learning_rate: float | None = Field(
        None,
        gt=0,
        le=1.0,
        description="Peak learning rate; None: 1e-4 for lora, 5e-6 for full.",
    )
    lr_scheduler: Literal["constant", "cosine"] = Field(
        "constant", description="Learning-rate schedule after the warm-up."
    )
    lr_warmup_steps: int = Field(
        0, ge=0, le=100_000, description="Linear warm-up steps from 0 to the learning rate."
    )
    adam_weight_decay: float = Field(1e-2, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, le=1000, description="Gradient clipping norm.")
    batch_size: int = Field(4, ge=1, le=256, description="Images per step per process.")
    gradient_accumulation: int = Field(
        1, ge=1, le=256, description="Micro-batches accumulated into one optimizer step."
    )
    max_steps: int = Field(1000, ge=1, le=1_000_000, description="Optimizer steps to train.")
    resolution: int | None = Field(
        None,
        ge=64,
        le=2048,
        multiple_of=8,
        description="Training pixel budget (side of a square's area); buckets keep aspect "
        "ratios. None: the model's own (512 for SD 1.5).",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(
        None, description="Autocast precision; None: bf16 on CUDA, no on CPU."
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute UNet activations in the backward pass (less memory)."
    )
    use_8bit_adam: bool = Field(
        True, description="bitsandbytes' 8-bit AdamW where it imports (AdamW otherwise)."
    )
    ema: bool = Field(False, description="Keep an EMA of the UNet weights (full mode only).")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay.")
    conditioning_dropout_prob: float = Field(
        0.05,
        ge=0,
        le=1 / 3,
        description="Per sample: the prompt is dropped with this probability, the input "
        "image with this probability, both with this probability (classifier-free "
        "guidance, as diffusers' train_instruct_pix2pix).",
    )
    checkpoint_every: int = Field(
        250, ge=1, le=1_000_000, description="Steps between resumable checkpoints."
    )
    keep_checkpoints: int = Field(2, ge=1, le=100, description="Checkpoints kept on disk.")
    validation_every: int = Field(
        250, ge=0, le=1_000_000, description="Steps between validation renders; 0: never."
    )
    validation_rows: int = Field(
        4, ge=0, le=64, description="Held-out rows rendered at each validation."
    )
    validation_inference_steps: int = Field(
        20, ge=1, le=200, description="Denoising steps of a validation render."
    )
    holdout_rows: int = Field(
        8, ge=0, le=10_000, description="Dataset rows kept out of training for validation."
    )
    log_every: int = Field(10, ge=1, le=100_000, description="Steps between progress lines.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the data order and noise.")

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.ema and self.mode != "full":
            raise ValueError("ema applies to full fine-tuning only (mode='full')")
        return self

    @property
    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return DEFAULT_LEARNING_RATE[self.mode]

    @property
    def lora_target_modules(self) -> list[str]:
        targets = list(self.target_modules)
        if self.lora_conv:
            targets += [m for m in CONV_TARGET_MODULES if m not in targets]
        return targets

    def resume_mismatches(self, saved: FinetuneConfig) -> list[str]:
        """The fields that differ from a checkpoint's config in a way that matters."""
        return [
            f"{name}: checkpoint {getattr(saved, name)!r}, now {getattr(self, name)!r}"
            for name in RESUME_FIELDS
            if getattr(saved, name) != getattr(self, name)
        ]
