"""``rlhf plan``: which stages would run and which would come from cache, without running anything.

Walks the DAG in order, computing each stage's fingerprint from its upstream outputs as recorded in
MLflow. A stage whose upstream is not cached cannot be fingerprinted yet: it will run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flows.stage_inputs import stage_inputs
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


STAGE_FINGERPRINTS = {
    DatasetStage: dataset_fingerprint,
    SFTStage: sft_fingerprint,
    RewardModelStage: reward_model_fingerprint,
    SampleStage: sample_fingerprint,
    RejectionSamplingStage: rejection_sampling_fingerprint,
    LabelPreferencesStage: label_preferences_fingerprint,
    EvaluateStage: evaluate_fingerprint,
}


def _fingerprint(spec: PipelineSpec, name: str, outputs: dict[str, dict[str, StageOutput]]) -> str | None:
    """The fingerprint the stage's task would compute, or None while an upstream output is unknown."""
    if name in spec.models:
        return base_model_fingerprint(name, spec.models[name], spec.seed)
    stage = spec.stages[name]
    fingerprint = STAGE_FINGERPRINTS.get(type(stage))
    if fingerprint is None:
        raise TypeError(f"stage '{name}': no fingerprint for kind {stage.kind!r}")
    try:
        inputs = stage_inputs(stage, outputs)
    except LookupError:
        return None
    return fingerprint(stage, spec.stage_seed(name), **inputs)
