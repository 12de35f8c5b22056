"""The ``promote`` stage: move a registry alias (``champion``) to a model only when its evaluation
passes a declared gate.

    promote:
      kind: promote
      model: grpo                      # a stage's registered policy
      evaluation: eval.report          # an evaluate stage that measured it
      gate:
        - {metric: win_rate/verifier, min: 0.55}
        - {metric: win_rate/verifier_ci_low, min: 0.5}
        - {metric: accuracy, max_drop_vs_champion: 0.02}

Pass: the alias moves to the new version and the version that held it keeps the ``previous_alias``
(for rollback). Fail: no alias moves, the version is tagged with the reason, and ``rlhf run`` exits
with status 3 (a failed gate is not a crash). The decision is this stage's output, cached like any
stage's: an unchanged pipeline re-run does not decide again (``--force <stage>`` does).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rlhf_core.spec.base import NAME_PATTERN, StageSpec, Strict
from rlhf_core.spec.references import PROMOTION, EvalReport, PolicyModel, RefType


class GateCondition(Strict):
    """One condition on a figure of the evaluation report; every condition of the gate must hold."""

    metric: str = Field(
        min_length=1,
        description=(
            "A figure of the evaluation report for the promoted model, with or without the 'eval/' "
            "prefix: accuracy, accuracy_ci_low, win_rate/<judge>, win_rate/<judge>_ci_low, pass_at_<k>, "
            "reward/<source>, kl_to_reference, length/mean, nll, ..."
        ),
    )
    min: float | None = Field(default=None, description="The figure must be >= this.")
    max: float | None = Field(default=None, description="The figure must be <= this.")
    max_drop_vs_champion: float | None = Field(
        default=None,
        ge=0,
        description=(
            "The figure may be at most this much below the current champion's recorded figure (the "
            "metrics of the champion version's logged model). Holds when there is no champion yet; fails "
            "when the champion has no such figure recorded."
        ),
    )

    @model_validator(mode="after")
    def _has_a_bound(self) -> GateCondition:
        if self.min is None and self.max is None and self.max_drop_vs_champion is None:
            raise ValueError(
                f"gate condition on '{self.metric}' has no bound: give min, max and/or max_drop_vs_champion"
            )
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"gate condition on '{self.metric}': min {self.min} is above max {self.max}")
        return self


class PromoteStage(StageSpec):
    """Move ``alias`` to the model's registered version when every gate condition holds."""

    kind: Literal["promote"]
    model: PolicyModel = Field(description="Stage whose registered model version is the candidate.")
    evaluation: EvalReport = Field(
        description="Evaluate stage report (`<stage>.report`) that includes the candidate in its models."
    )
    gate: tuple[GateCondition, ...] = Field(
        description="Conditions on the candidate's figures (at least one); all must hold to promote."
    )
    alias: str = Field(
        default="champion", pattern=NAME_PATTERN, description="Alias moved to the candidate on a pass."
    )
    previous_alias: str = Field(
        default="previous-champion",
        pattern=NAME_PATTERN,
        description="Alias given to the version that held `alias` before (the rollback target).",
    )

    outputs: ClassVar[dict[str, RefType]] = {"decision": PROMOTION}

    @field_validator("gate")
    @classmethod
    def _at_least_one_condition(cls, gate: tuple[GateCondition, ...]) -> tuple[GateCondition, ...]:
        # A validator, not min_length: pydantic also reports min_length when an item is invalid.
        if not gate:
            raise ValueError("give at least one condition (an ungated promotion is `rlhf models promote`)")
        return gate

    @model_validator(mode="after")
    def _distinct_aliases(self) -> PromoteStage:
        if self.alias == self.previous_alias:
            raise ValueError(f"alias and previous_alias must differ (both '{self.alias}')")
        if "candidate" in (self.alias, self.previous_alias):
            raise ValueError("'candidate' is the alias every new version gets; promote to another alias")
        return self
