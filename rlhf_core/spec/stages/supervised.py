"""The ``sft`` stage: supervised fine-tuning on assistant tokens (book ch.4); with ``judge``, a
generative reward model fine-tuned on judge prompts and verdicts (book ch.5, LLM-as-a-judge)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf_core.spec.base import StageSpec, Strict
from rlhf_core.spec.references import PolicyModel, PreferenceData, RefType, SFTData, model_output
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


class JudgeTrainingSpec(Strict):
    """Judge SFT rows from preference rows: the pairwise judge prompt a policy judge is asked (the
    principles, the question, responses A and B) with the verdict as completion, ``[[A]]`` when the
    chosen response is A and ``[[B]]`` when it is B."""

    preferences: PreferenceData = Field(
        description="Preference dataset whose train split gives the verdicts, e.g. label.preferences."
    )
    principles: tuple[str, ...] = Field(
        min_length=1,
        description="The rubric written into every judge prompt; give the judge's users the same one.",
    )
    both_orders: bool = Field(
        default=True,
        description="Each pair in both orders (chosen as A, then as B), so the judge learns no position "
        "preference; false: chosen as A or B at random per pair (seeded).",
    )


class SFTStage(StageSpec):
    """Supervised fine-tuning with prompt masking (only assistant tokens are trained); a judge model
    when ``judge`` gives preference rows to learn verdicts from."""

    kind: Literal["sft"]
    model: PolicyModel = Field(
        description="Model to fine-tune: a `models:` entry or a model-producing stage."
    )
    data: SFTData | None = Field(
        default=None, description="SFT dataset reference, e.g. data.sft (optional with judge)."
    )
    judge: JudgeTrainingSpec | None = Field(
        default=None,
        description="Also train on judge prompts and verdicts made from preference rows (added to the "
        "rows of data, if given): a generative reward model.",
    )
    register_role: Literal["policy", "judge"] | None = Field(
        default=None,
        description="Role of the registered model: judge (usable where a judge model is asked) or "
        "policy; left out: judge with `judge`, else policy.",
    )
    train: SFTTrainSpec = Field(default_factory=SFTTrainSpec, description="Training hyperparameters.")
    lora: LoraSpec | None = Field(default=None, description="Train LoRA adapters instead of all weights.")
    register_as: str | None = Field(
        default=None, description="Registered model name; default '<pipeline>-<stage>'."
    )

    outputs: ClassVar[dict[str, RefType]] = {"model": model_output("policy")}  # see output_types
    trains_in_processes: ClassVar[bool] = True

    @model_validator(mode="after")
    def _rows_and_role(self) -> SFTStage:
        if self.data is None and self.judge is None:
            raise ValueError("give data (an sft dataset), judge (preference rows for a judge model), or both")
        if self.register_role is None:
            object.__setattr__(self, "register_role", "judge" if self.judge is not None else "policy")
        return self

    def output_types(self) -> dict[str, RefType]:
        return {"model": model_output(self.register_role or "policy")}
