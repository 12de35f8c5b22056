"""A stage's inputs, resolved to refs: the keyword arguments of its task and of its fingerprint.

One mapping for both the flow (which calls the task) and ``rlhf plan`` (which computes the fingerprint
the task would compute), so the two cannot disagree about what a stage depends on.
"""

from __future__ import annotations

from typing import Any

from rlhf_core.refs import StageOutput
from rlhf_core.spec import (
    EvaluateStage,
    LabelPreferencesStage,
    RejectionSamplingStage,
    RewardModelStage,
    SampleStage,
    SFTStage,
    Stage,
    resolve_ref,
)


def stage_inputs(stage: Stage, outputs: dict[str, dict[str, StageOutput]]) -> dict[str, Any]:
    """Refs of ``stage``'s inputs, by the parameter names of its task; LookupError if one is missing."""

    def ref(text: str | None) -> StageOutput | None:
        return None if text is None else resolve_ref(text, outputs)

    def reward_models(sources) -> dict[str, StageOutput]:
        return {s.name: ref(s.model) for s in sources if s.model is not None}

    if isinstance(stage, SFTStage | RewardModelStage):
        return {"model": ref(stage.model), "data": ref(stage.data)}
    if isinstance(stage, SampleStage):
        return {
            "policy": ref(stage.policy),
            "prompts": ref(stage.prompts),
            "reward_models": reward_models(stage.rewards),
        }
    if isinstance(stage, RejectionSamplingStage):
        return {"completions": ref(stage.completions)}
    if isinstance(stage, LabelPreferencesStage):
        judges = reward_models(stage.judge)
        if stage.judge_policy is not None:
            judges["policy"] = ref(stage.judge_policy.model)
        return {"completions": ref(stage.completions), "judge_models": judges}
    if isinstance(stage, EvaluateStage):
        return {
            "models": {m: ref(m) for m in stage.models},
            "data": ref(stage.data),
            "prompts": ref(stage.prompts),
            "reward_models": reward_models(stage.best_of_n.rewards if stage.best_of_n else ()),
        }
    return {}
