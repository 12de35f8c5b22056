"""The ``outcome_reward_model`` and ``process_reward_model`` stages: per-token reward heads trained on
correctness labels (book ch.5). Both register a ``reward`` model, usable wherever a reward model is."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf_core.spec.base import StageSpec
from rlhf_core.spec.references import OutcomeData, PolicyModel, RefType, StepLabelData, model_output
from rlhf_core.spec.training import OptimSpec

DEFAULT_SEPARATOR = "\n<step>\n"  # the book's companion code; kept in step with the model's module


class TokenRewardTrainSpec(OptimSpec):
    """Hyperparameters shared by the outcome and process reward models (one epoch, book ch.5)."""

    batch_size: int = Field(default=8, ge=1, description="Sequences per micro-batch.")
    max_length: int = Field(
        default=2048,
        ge=8,
        description="Longest prompt + completion, in tokens; left out: 2048, or the model's position limit "
        "when smaller.",
    )
    on_overlong: Literal["fail", "skip"] = Field(
        default="fail", description="A row longer than max_length: stop with its row, or skip and count it."
    )


class OutcomeRewardTrainSpec(TokenRewardTrainSpec):
    """ORM defaults of the book's companion (section 6.8): lr 1e-5, effective batch 32 (8 x 4), one
    epoch, linear decay without warmup."""

    lr: float = Field(default=1e-5, gt=0, description="Peak learning rate of AdamW.")
    grad_accum: int = Field(default=4, ge=1, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="Fraction of steps of linear warmup.")


class ProcessRewardTrainSpec(TokenRewardTrainSpec):
    """PRM defaults of the book's companion (section 6.8): lr 5e-5, effective batch 16 (8 x 2), one
    epoch, warmup then a constant rate; at most 12 steps per solution."""

    lr: float = Field(default=5e-5, gt=0, description="Peak learning rate of AdamW.")
    grad_accum: int = Field(default=2, ge=1, description="Micro-batches per optimizer step.")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        default="constant", description="Decay after warmup (constant: the companion's warmup-only schedule)."
    )
    max_solution_steps: int = Field(
        default=12, ge=1, description="Steps kept of each solution (its first ones; the companion's 12)."
    )


class OutcomeRewardModelStage(StageSpec):
    """An outcome reward model (ORM): P(the completion is correct) at every completion token (ch.5)."""

    kind: Literal["outcome_reward_model"]
    model: PolicyModel = Field(
        description="Policy whose backbone initialises the ORM (usually the SFT model)."
    )
    data: OutcomeData = Field(
        description="Outcome dataset reference (prompt, completion, correct), e.g. data.outcomes."
    )
    loss: Literal["token", "sequence"] = Field(
        default="token",
        description="token: BCE at every completion token, averaged per sequence (Lightman 2023). "
        "sequence: BCE of sigma(mean of the token logits), the sigmoid after the mean (Lyu 2025).",
    )
    train: OutcomeRewardTrainSpec = Field(
        default_factory=OutcomeRewardTrainSpec, description="Training hyperparameters."
    )
    register_as: str | None = Field(
        default=None, description="Registered model name; default '<pipeline>-<stage>'."
    )

    outputs: ClassVar[dict[str, RefType]] = {"model": model_output("reward")}


class ProcessRewardModelStage(StageSpec):
    """A process reward model (PRM): a score for every reasoning step, read at the step's end (ch.5)."""

    kind: Literal["process_reward_model"]
    model: PolicyModel = Field(description="Policy whose backbone initialises the PRM.")
    data: StepLabelData = Field(
        description="Step-label dataset reference (prompt, steps, labels), e.g. data.step_labels."
    )
    labels: Literal["binary", "three_class"] = Field(
        default="binary",
        description="binary: one logit, BCE at each step end (a label 1 is a good step; 0 or -1 a bad one). "
        "three_class: a 3-way head for PRM800K ratings -1/0/+1, cross-entropy at each step end.",
    )
    separator: str = Field(
        default=DEFAULT_SEPARATOR,
        description="Text appended after every step; the step's score is read at its last token. Saved with "
        "the model: scoring splits completions by it.",
    )
    train: ProcessRewardTrainSpec = Field(
        default_factory=ProcessRewardTrainSpec, description="Training hyperparameters."
    )
    register_as: str | None = Field(
        default=None, description="Registered model name; default '<pipeline>-<stage>'."
    )

    outputs: ClassVar[dict[str, RefType]] = {"model": model_output("reward")}

    @model_validator(mode="after")
    def _separator_is_visible(self) -> ProcessRewardModelStage:
        if not self.separator.strip():
            raise ValueError(
                f"separator {self.separator!r} is only whitespace, which a tokenizer may merge into the "
                "step text; give one with a visible marker, e.g. '\\n<step>\\n'"
            )
        return self
