"""The ``reward_model`` stage: a Bradley-Terry or Plackett-Luce reward model on a policy's backbone (ch.5)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rlhf_core.errors import UserError
from rlhf_core.rewards.scorers import check_scorer
from rlhf_core.spec.base import StageSpec, Strict
from rlhf_core.spec.function_references import RewardFunctionName
from rlhf_core.spec.references import PolicyModel, PreferenceData, RefType, model_output
from rlhf_core.spec.training import OptimSpec


class RewardTrainSpec(OptimSpec):
    """Reward-model hyperparameters (book ch.5; one epoch is the common practice)."""

    lr: float = Field(default=5e-5, gt=0, description="Peak learning rate of AdamW.")
    batch_size: int = Field(
        default=8, ge=1, description="Prompts per micro-batch (all pairs of a prompt together)."
    )
    max_length: int = Field(
        default=256,
        ge=8,
        description=(
            "Longest prompt + completion, in tokens; left out: 256, or the model's position limit "
            "when smaller."
        ),
    )
    on_overlong: Literal["fail", "skip"] = Field(
        default="fail", description="A pair longer than max_length: stop with its row, or skip and count it."
    )
    margin_column: str | None = Field(
        default=None, description="Column with the Llama 2 margin m(y_c, y_r) subtracted inside the loss."
    )
    shared_prefix: bool = Field(
        default=True,
        description=(
            "Score the distinct completions of a prompt in one row that holds the prompt once (same "
            "rewards, fewer tokens). Needs sdpa or eager attention; other kernels use padded rows."
        ),
    )


RewardLoss = Literal["bradley_terry", "plackett_luce"]


class RewardEvalSpec(Strict):
    """Breakdowns of the held-out evaluation (book ch.5, RM evaluation): accuracy by category and by
    margin bucket, calibration of sigma(r_c - r_r), agreement with a verifier. A bucket edge list
    (e_1, ..., e_k) gives the buckets [0, e_1), [e_1, e_2), ..., [e_k, inf)."""

    category_column: str | None = Field(
        default=None, description="Column naming each pair's category: eval/accuracy/<category> per value."
    )
    margin_edges: tuple[float, ...] = Field(
        default=(0.5, 1.0, 2.0),
        description="Bucket edges of the model's margin |r_c - r_r|: eval/by_margin/accuracy/<bucket>.",
    )
    label_margin_column: str | None = Field(
        default=None,
        description="Column with a labelled margin (e.g. a Likert difference) to bucket accuracy by "
        "(eval/by_label_margin/accuracy/<bucket>); left out: train.margin_column, when given.",
    )
    label_margin_edges: tuple[float, ...] = Field(
        default=(1.0, 2.0, 3.0), description="Bucket edges of the labelled margin's absolute value."
    )
    calibration_bins: int = Field(
        default=10, ge=1, le=100, description="Equal-width bins of the confidence max(p, 1 - p) in [0.5, 1]."
    )
    verifier: RewardFunctionName | None = Field(
        default=None,
        description="A verifier (built-in, e.g. arithmetic_exact, or yours as 'rewards.py:correct') that "
        "scores chosen and rejected: eval/verifier_agreement, the share of pairs it orders that the "
        "reward model orders the same way.",
    )
    verifier_options: dict[str, Any] = Field(
        default_factory=dict, description="Options of the verifier (a built-in's defaults filled in)."
    )

    @field_validator("margin_edges", "label_margin_edges")
    @classmethod
    def _increasing_positive(cls, edges: tuple[float, ...]) -> tuple[float, ...]:
        if any(e <= 0 for e in edges) or any(a >= b for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"bucket edges must be positive and strictly increasing, got {list(edges)}")
        return edges

    @model_validator(mode="after")
    def _check_verifier(self) -> RewardEvalSpec:
        if self.verifier is None:
            if self.verifier_options:
                raise ValueError("verifier_options are for a verifier: give verifier too")
            return self
        try:
            filled = check_scorer(self.verifier, self.verifier_options, verifier=True)
        except UserError as exc:
            raise ValueError(f"verifier: {exc}") from None
        object.__setattr__(self, "verifier_options", filled)
        return self


class RewardModelStage(StageSpec):
    """A reward model: scalar head on the backbone of a policy model, trained on preferences (book ch.5)."""

    kind: Literal["reward_model"]
    model: PolicyModel = Field(
        description="Policy whose backbone initialises the reward model (usually the SFT model)."
    )
    data: PreferenceData = Field(description="Preference dataset reference, e.g. data.preferences.")
    loss: RewardLoss = Field(
        default="bradley_terry",
        description=(
            "bradley_terry: each pair on its own (a prompt's C(K, 2) pairs weighed 1 / C(K, 2), "
            "InstructGPT). "
            "plackett_luce: each prompt's completions as one ranking, the total order its pairs imply "
            "(listwise; a prompt whose pairs do not give one order is refused, naming its rows)."
        ),
    )
    train: RewardTrainSpec = Field(default_factory=RewardTrainSpec, description="Training hyperparameters.")
    evaluation: RewardEvalSpec = Field(
        default_factory=RewardEvalSpec,
        description="Breakdowns of the held-out evaluation on the data's eval split (categories, margin "
        "buckets, calibration, verifier agreement).",
    )
    register_as: str | None = Field(
        default=None, description="Registered model name; default '<pipeline>-<stage>'."
    )

    outputs: ClassVar[dict[str, RefType]] = {"model": model_output("reward")}
    trains_in_processes: ClassVar[bool] = True

    @model_validator(mode="after")
    def _margin_is_pairwise(self) -> RewardModelStage:
        if self.loss == "plackett_luce" and self.train.margin_column is not None:
            raise ValueError(
                "train.margin_column is a margin between the two completions of a pair; loss "
                "plackett_luce ranks all of a prompt's completions at once and takes none: remove "
                "margin_column or use loss: bradley_terry"
            )
        return self

    @model_validator(mode="after")
    def _label_margin_from_train(self) -> RewardModelStage:
        """The labelled margin the loss uses is the one to bucket by, unless another is named."""
        if self.evaluation.label_margin_column is None and self.train.margin_column is not None:
            filled = self.evaluation.model_copy(update={"label_margin_column": self.train.margin_column})
            object.__setattr__(self, "evaluation", filled)
        return self
