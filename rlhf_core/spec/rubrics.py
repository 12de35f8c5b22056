"""A rubric reward source in a spec (book ch.12, "Rubrics"): per-prompt rubric items in a prompt column,
each checked by a judge model behind an OpenAI-compatible endpoint; the reward is the weighted share of
items satisfied (:mod:`rlhf_core.rewards.rubrics` has the formula and the item format).

What the judge is and how the score is formed (model, answer length, column, category weights, clipping,
prompt template) is fingerprinted; where the judge is served is not.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from rlhf_core.rewards.rubrics import DEFAULT_CATEGORY_WEIGHTS
from rlhf_core.spec.base import Strict
from rlhf_core.spec.endpoints import ChatEndpointSpec

RUBRIC_TEMPLATE_VERSION = "rubric-item-v1"  # bump with rlhf_core.rewards.rubrics.rubric_item_prompt


class RubricSpec(Strict):
    """Score each completion by its prompt's rubric: a judge answers [[YES]]/[[NO]] per item and the reward
    is sum_i w_i * 1[satisfied_i] / sum_{i: w_i > 0} w_i."""

    column: str = Field(
        default="rubric",
        min_length=1,
        description="Prompt column holding each prompt's rubric: a list of {criterion, weight} or "
        "{criterion, category} (a JSON string of that list also works).",
    )
    judge: ChatEndpointSpec = Field(description="The judge model behind an OpenAI-compatible endpoint.")
    name: str | None = Field(
        default=None, description="Short name: the source is `rubric:<name>`; default: the judge model."
    )
    weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_CATEGORY_WEIGHTS),
        description="Category -> weight, for items given by category. Default (our choice within the "
        "book's ranges, Essential/Important/Optional 1-5, Pitfall -1 or -2): essential 5, important 3, "
        "optional 1, pitfall -1.",
    )
    clip: bool = Field(
        default=True,
        description="Clip the reward to [0, 1]: satisfied pitfalls can push the weighted share below 0 "
        "(down to -sum|pitfall weights| / sum of positive weights); false keeps that negative value.",
    )
    on_unparseable: Literal["skip", "fail"] = Field(
        default="skip",
        description="A judge answer without [[YES]]/[[NO]]: the row's reward is invalid (NaN: the stage's "
        "rule for invalid rewards drops and counts it), or stop naming the row and the criterion.",
    )
    prompt_template: Literal["rubric-item-v1"] = Field(
        default=RUBRIC_TEMPLATE_VERSION,
        description="Version of the per-item judge prompt (fingerprinted: a reworded prompt re-runs).",
    )

    @field_validator("weights")
    @classmethod
    def _finite_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in weights.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"category weights must be finite numbers, got {bad}")
        return {k.lower(): v for k, v in weights.items()}

    @property
    def source_name(self) -> str:
        """The source's key in scores and metric names: ``rubric:<name or judge model>``."""
        return f"rubric:{self.name or self.judge.model}"
