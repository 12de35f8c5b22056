"""``rlhf plan``: which stages would run and which would come from cache, without running anything.

Walks the DAG in order, computing each stage's fingerprint from its upstream outputs as recorded in
MLflow. A stage whose upstream is not cached cannot be fingerprinted yet: it will run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from registry import stage_cache, tracking
from rlhf_core.fingerprint import (
    base_model_fingerprint,
    dataset_fingerprint,
    evaluate_fingerprint,
    label_preferences_fingerprint,
    rejection_sampling_fingerprint,
    reward_model_fingerprint,
    sample_fingerprint,
    sft_fingerprint,
)
from rlhf_core.refs import StageOutput
from rlhf_core.settings import RLHFSettings
from rlhf_core.spec import (
    DatasetStage,
    EvaluateStage,
    LabelPreferencesStage,
    PipelineSpec,
    RejectionSamplingStage,
    RewardModelStage,
    SampleStage,
    SFTStage,
    resolve_ref,
)


@dataclass
class PlannedStage:
    stage: str
    kind: str
    action: str  # "cached" or "run"
    reason: str
    fingerprint: str | None = None
    run_id: str | None = None


def plan_pipeline(spec: PipelineSpec, force: set[str], home: str) -> list[PlannedStage]:
    settings = RLHFSettings(home=Path(home))
    tracking.configure(settings)
    experiment = tracking.client().get_experiment_by_name(spec.name)
    outputs: dict[str, dict[str, StageOutput]] = {}  # only stages that would come from cache
    plan: list[PlannedStage] = []
    names = [*spec.models, *spec.topological_order()]
    for name in names:
        kind = "base_model" if name in spec.models else spec.stages[name].kind
        fingerprint = _fingerprint(spec, name, outputs)
        if fingerprint is None:
            plan.append(PlannedStage(name, kind, "run", "an upstream stage will run"))
            continue
        cached = stage_cache.find_cached_stage(experiment.experiment_id, fingerprint) if experiment else None
        if name in force:
            plan.append(PlannedStage(name, kind, "run", "forced", fingerprint))
        elif cached is None:
            plan.append(PlannedStage(name, kind, "run", "no finished run with this fingerprint", fingerprint))
        else:
            plan.append(PlannedStage(name, kind, "cached", "fingerprint found", fingerprint, cached.run_id))
            outputs[name] = cached.outputs
    return plan


def _fingerprint(spec: PipelineSpec, name: str, outputs: dict[str, dict[str, StageOutput]]) -> str | None:
    if name in spec.models:
        return base_model_fingerprint(name, spec.models[name], spec.seed)
    stage, seed = spec.stages[name], spec.stage_seed(name)
    if isinstance(stage, DatasetStage):
        return dataset_fingerprint(stage, seed)

    def ref(text: str | None) -> StageOutput | None:
        return None if text is None else resolve_ref(text, outputs)

    try:
        if isinstance(stage, SFTStage):
            return sft_fingerprint(stage, seed, ref(stage.model), ref(stage.data))
        if isinstance(stage, RewardModelStage):
            return reward_model_fingerprint(stage, seed, ref(stage.model), ref(stage.data))
        if isinstance(stage, SampleStage):
            models = {s.name: ref(s.model) for s in stage.rewards if s.model is not None}
            return sample_fingerprint(stage, seed, ref(stage.policy), ref(stage.prompts), models)
        if isinstance(stage, RejectionSamplingStage):
            return rejection_sampling_fingerprint(stage, seed, ref(stage.completions))
        if isinstance(stage, LabelPreferencesStage):
            judges = {s.name: ref(s.model) for s in stage.judge if s.model is not None}
            if stage.judge_policy is not None:
                judges["policy"] = ref(stage.judge_policy.model)
            return label_preferences_fingerprint(stage, seed, ref(stage.completions), judges)
        if isinstance(stage, EvaluateStage):
            return evaluate_fingerprint(
                stage, seed, {m: ref(m) for m in stage.models}, ref(stage.data), ref(stage.prompts)
            )
    except LookupError:
        return None
    raise TypeError(f"stage '{name}': no fingerprint for kind {stage.kind!r}")
