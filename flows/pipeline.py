"""The pipeline flow: a PipelineSpec compiled into Prefect tasks, one per stage, in DAG order.

Walkthrough of one run:
1. open the MLflow experiment of the pipeline and a parent run (tags: Prefect flow run, spec digest,
   git commit); log the resolved spec;
2. materialize each base model under ``models:``;
3. run the stages in topological order: for each, resolve its inputs to refs and compute its
   fingerprint (``flows.stage_calls``), then call the task registered for its kind, which returns a
   ``StageOutcome`` (ran / resumed / cached, metrics, MLflow run, registered version);
4. close the parent run (FAILED if any stage failed) and return the outcomes.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect import flow
from prefect.runtime import flow_run

from flows.stage_calls import base_model_call, stage_call
from registry import tracking
from rlhf_core.errors import UserError
from rlhf_core.refs import StageOutput
from rlhf_core.settings import RLHFSettings
from rlhf_core.spec import PipelineSpec
from tasks.prepare_base_model import prepare_base_model
from tasks.registration import task_for_kind
from tasks.stage_execution import RunContext, StageOutcome


@flow(name="rlhf-pipeline", log_prints=True)
def run_pipeline(
    spec: PipelineSpec, force: list[str] | None = None, home: str = ".rlhf"
) -> list[StageOutcome]:
    """Run every stage of ``spec``; stages whose fingerprint is already in MLflow are taken from cache.

    ``force`` names stages (or models) to re-run together with everything downstream of them.
    """
    settings = RLHFSettings(home=Path(home))
    tracking.configure(settings)
    experiment_id = tracking.ensure_experiment(spec.name, settings)
    commit = tracking.git_commit()
    spec_digest = spec.digest()
    parent = tracking.start_pipeline_run(
        experiment_id,
        spec.name,
        {
            "prefect.flow_run_id": str(flow_run.get_id() or ""),
            "rlhf.spec_digest": spec_digest,
            "rlhf.git_commit": commit,
        },
    )
    tracking.log_text(
        parent, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "resolved_spec.yaml"
    )
    ctx = RunContext(
        pipeline=spec.name,
        experiment_id=experiment_id,
        parent_run_id=parent,
        home=str(settings.resolved_home()),
        git_commit=commit,
        spec_digest=spec_digest,
        forced=tuple(sorted(forced_stages(spec, force or []))),
    )
    outcomes: list[StageOutcome] = []
    try:
        outputs: dict[str, dict[str, StageOutput]] = {}
        for name in spec.models:
            outcome = prepare_base_model(ctx, base_model_call(spec, name))
            outputs[name] = outcome.outputs
            outcomes.append(outcome)
        for name in spec.topological_order():
            call = stage_call(spec, name, outputs)  # inputs resolved and checked, fingerprint computed
            outcome = task_for_kind(call.kind)(ctx, call)
            outputs[name] = outcome.outputs
            outcomes.append(outcome)
    except BaseException:
        tracking.end_run(parent, "FAILED")
        raise
    tracking.set_tags(parent, {f"stage.{o.stage}": f"{o.status} run={o.run_id}" for o in outcomes})
    tracking.end_run(parent, "FINISHED")
    return outcomes


def forced_stages(spec: PipelineSpec, force: list[str]) -> set[str]:
    """The named stages/models and everything downstream of them; unknown names are an error."""
    unknown = [f for f in force if f not in spec.stages and f not in spec.models]
    if unknown:
        known = ", ".join([*spec.models, *spec.stages])
        raise UserError(f"--force: unknown stage(s) {', '.join(unknown)} (known: {known})")
    forced: set[str] = set()
    for name in force:
        forced |= spec.downstream_of(name)
    return forced
