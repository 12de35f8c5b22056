"""Reward sources in a spec: a registered reward function or a reward-model stage, with a weight."""

from __future__ import annotations

from pydantic import Field, model_validator

from rlhf_core.rewards import REWARD_FUNCTIONS
from rlhf_core.spec.base import Strict
from rlhf_core.spec.references import RewardModel


class RewardSourceSpec(Strict):
    """One scorer of completions: a registered reward function or a reward-model stage, with a weight."""

    function: str | None = Field(
        default=None, description="Registered reward function, e.g. arithmetic_exact."
    )
    model: RewardModel | None = Field(
        default=None, description="Reward-model reference (a reward_model stage)."
    )
    weight: float = Field(default=1.0, description="Weight w_s in the composite sum_s w_s * r_s(x, y).")

    @model_validator(mode="after")
    def _exactly_one(self) -> RewardSourceSpec:
        if (self.function is None) == (self.model is None):
            raise ValueError("give exactly one of function or model")
        if self.function is not None and self.function not in REWARD_FUNCTIONS:
            raise ValueError(
                f"unknown reward function '{self.function}' (known: {', '.join(REWARD_FUNCTIONS)})"
            )
        return self

    @property
    def name(self) -> str:
        return self.function or f"rm:{self.model}"
