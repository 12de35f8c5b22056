"""The ``reward_model`` stage: a Bradley-Terry or Plackett-Luce reward model on a policy's backbone (ch.5)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf_core.spec.base import StageSpec
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
