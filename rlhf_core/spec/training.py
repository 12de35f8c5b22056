"""Settings shared by the trainers: the optimizer loop and LoRA adapters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf_core.spec.base import Strict


class LoraSpec(Strict):
    """LoRA adapters through peft; merged into the weights when the stage finishes."""

    r: int = Field(default=8, ge=1, description="Adapter rank.")
    alpha: int = Field(default=16, ge=1, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: tuple[str, ...] = Field(
        default=("q_proj", "k_proj", "v_proj", "o_proj"), description="Module names that get adapters."
    )


class OptimSpec(Strict):
    """Optimisation settings shared by the offline trainers (AdamW, warmup + decay, clipping, checkpoints)."""

    epochs: int = Field(default=1, ge=1, description="Passes over the training split.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    lr: float = Field(default=3e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay.")
    batch_size: int = Field(default=8, ge=1, description="Rows per micro-batch (packed rows when packing).")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Fraction of steps of linear warmup.")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        default="linear", description="Decay after warmup."
    )
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Clip gradients to this L2 norm.")
    checkpoint_every: int = Field(default=50, ge=1, description="Save a resumable checkpoint every N steps.")
    log_every: int = Field(default=10, ge=1, description="Report metrics every N steps.")
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description=(
            "fp32, or bf16 mixed precision (bf16 autocast for the forward pass; weights, gradients and "
            "optimizer state stay fp32). bf16 pays off on GPUs; on CPU it is usually slower."
        ),
    )
