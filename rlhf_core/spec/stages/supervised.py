"""The ``sft`` stage: supervised fine-tuning on assistant tokens (book ch.4)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from rlhf_core.spec.base import StageSpec
from rlhf_core.spec.references import PolicyModel, RefType, SFTData, model_output
from rlhf_core.spec.training import LoraSpec, OptimSpec


class SFTTrainSpec(OptimSpec):
    """Supervised fine-tuning hyperparameters (book ch.4)."""

    max_length: int = Field(
        default=256,
        ge=8,
        description=(
            "Longest tokenized example; longer rows are cut. Left out: 256, or the model's position limit "
            "when smaller."
        ),
    )
    packing: bool = Field(
        default=True, description="Pack examples into rows; examples never attend across boundaries."
    )
    mask: Literal["all_assistant", "final_turn"] = Field(
        default="all_assistant",
        description=(
            "Which assistant turns of a `messages` row are trained: all of them, or only the last one "
            "(book 4.3). Prompt/completion rows always train the completion only."
        ),
    )


class SFTStage(StageSpec):
    """Supervised fine-tuning with prompt masking (only assistant tokens are trained)."""

    kind: Literal["sft"]
    model: PolicyModel = Field(
        description="Model to fine-tune: a `models:` entry or a model-producing stage."
    )
    data: SFTData = Field(description="SFT dataset reference, e.g. data.sft.")
    train: SFTTrainSpec = Field(default_factory=SFTTrainSpec, description="Training hyperparameters.")
    lora: LoraSpec | None = Field(default=None, description="Train LoRA adapters instead of all weights.")
    register_as: str | None = Field(
        default=None, description="Registered model name; default '<pipeline>-<stage>'."
    )

    outputs: ClassVar[dict[str, RefType]] = {"model": model_output("policy")}
    trains_in_processes: ClassVar[bool] = True
