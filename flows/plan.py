"""``rlhf plan``: which stages would run and which would come from cache, without running anything.

Walks the DAG in order, computing each stage's fingerprint (with the same function the flow uses
before it calls a task) from its upstream outputs as recorded in MLflow. A stage whose upstream is
not cached cannot be fingerprinted yet: it will run. The cache is looked up as a run does: in every
experiment of the tracking store, the pipeline's own first (``registry.stage_cache``); a result of
another pipeline says so in ``reason`` and ``origin``. Each stage also lists the defaults its spec
leaves out with the values they take (a loss's beta, an algorithm's clip range, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.stage_calls import UpstreamNotReady, base_model_call, stage_call
from registry import stage_cache, tracking
from registry.lineage import check_registered_models
from rlhf_core.refs import StageOutput
from rlhf_core.settings import RLHFSettings
from rlhf_core.spec import PipelineSpec
from rlhf_core.spec.loading import resolve_spec
from rlhf_core.spec.pipeline import filled_defaults


@dataclass
class PlannedStage:
    stage: str
    kind: str
    action: str  # "cached" or "run"
    reason: str
    fingerprint: str | None = None
    run_id: str | None = None
    where: str = "here"  # "here" (the pipeline's process) or "pool <name>"; "x N processes" when N > 1
    origin: str | None = None  # the pipeline whose run would be reused, when it is another pipeline
    filled: dict[str, Any] = field(default_factory=dict)  # defaults the spec leaves out -> effective value


def plan_pipeline(spec: PipelineSpec, force: set[str], home: str) -> list[PlannedStage]:
    written, spec = spec, resolve_spec(spec)  # fingerprints of the values that would run, as in the flow
    settings = RLHFSettings(home=Path(home))
    tracking.configure(settings)
    check_registered_models(spec)
    experiment = tracking.client().get_experiment_by_name(spec.name)
    own = experiment.experiment_id if experiment else None  # none yet: other pipelines' runs still count
    outputs: dict[str, dict[str, StageOutput]] = {}  # only stages that would come from cache
    plan: list[PlannedStage] = []
    for name in [*spec.models, *spec.topological_order()]:
        where = _where(spec, name)
        try:
            call = base_model_call(spec, name) if name in spec.models else stage_call(spec, name, outputs)
        except UpstreamNotReady:
            kind = spec.stages[name].kind
            plan.append(PlannedStage(name, kind, "run", "an upstream stage will run", where=where))
            continue
        cached = stage_cache.find_cached_stage(own, call.fingerprint)
        if name in force:
            plan.append(PlannedStage(name, call.kind, "run", "forced", call.fingerprint, where=where))
        elif cached is None:
            reason = "no finished run with this fingerprint"
            plan.append(PlannedStage(name, call.kind, "run", reason, call.fingerprint, where=where))
        else:
            origin = cached.origin.pipeline if cached.origin.experiment_id != own else None
            reason = f"fingerprint found in pipeline {origin}" if origin else "fingerprint found"
            plan.append(
                PlannedStage(
                    name, call.kind, "cached", reason, call.fingerprint, cached.run_id, where, origin
                )
            )
            outputs[name] = cached.outputs
    for planned in plan:
        if planned.stage in spec.stages:
            planned.filled = filled_defaults(written.stages[planned.stage], spec.stages[planned.stage])
    return plan


def _where(spec: PipelineSpec, name: str) -> str:
    if name not in spec.stages:
        return "here"
    compute = spec.compute_of(name)
    where = f"pool {compute.pool}" if compute.pool else "here"
    return where + (f" x {compute.processes} processes" if compute.processes > 1 else "")
