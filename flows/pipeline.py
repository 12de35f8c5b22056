"""The pipeline flow: a PipelineSpec compiled into Prefect tasks, one per stage, in DAG order.

Walkthrough of one run:
1. open the MLflow experiment of the pipeline and a parent run (tags: Prefect flow run, spec digest,
   git commit); log the resolved spec;
2. materialize each base model under ``models:``;
3. run the stages in topological order; each task takes the refs its inputs resolve to and returns a
   ``StageOutcome`` (ran / resumed / cached, metrics, MLflow run, registered version);
4. close the parent run (FAILED if any stage failed) and return the outcomes.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect import flow
from prefect.runtime import flow_run

from flows.stage_inputs import stage_inputs
from registry import tracking
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
from tasks.build_dataset import build_dataset
from tasks.evaluate_models import evaluate_models
from tasks.label_preferences import label_preferences
from tasks.prepare_base_model import prepare_base_model
from tasks.sample_completions import sample_completions
from tasks.select_completions import select_completions
from tasks.stage_execution import RunContext, StageOutcome
from tasks.train_reward_model import train_reward_model
from tasks.train_sft import train_sft


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
    parent = tracking.start_pipeline_run(
        experiment_id,
        spec.name,
        {
            "prefect.flow_run_id": str(flow_run.get_id() or ""),
            "rlhf.spec_digest": spec.digest(),
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
        forced=tuple(sorted(forced_stages(spec, force or []))),
    )
    outcomes: list[StageOutcome] = []
    try:
        outputs: dict[str, dict[str, StageOutput]] = {}
        for name, source in spec.models.items():
            outcome = prepare_base_model(ctx, name, source, spec.seed)
            outputs[name] = outcome.outputs
            outcomes.append(outcome)
        for name in spec.topological_order():
            outcome = run_stage(ctx, spec, name, outputs)
            outputs[name] = outcome.outputs
            outcomes.append(outcome)
    except BaseException:
        tracking.end_run(parent, "FAILED")
        raise
    tracking.set_tags(parent, {f"stage.{o.stage}": f"{o.status} run={o.run_id}" for o in outcomes})
    tracking.end_run(parent, "FINISHED")
    return outcomes


STAGE_TASKS = {
    DatasetStage: build_dataset,
    SFTStage: train_sft,
    RewardModelStage: train_reward_model,
    SampleStage: sample_completions,
    RejectionSamplingStage: select_completions,
    LabelPreferencesStage: label_preferences,
    EvaluateStage: evaluate_models,
}


def run_stage(
    ctx: RunContext, spec: PipelineSpec, name: str, outputs: dict[str, dict[str, StageOutput]]
) -> StageOutcome:
    """Call the task of a stage's kind with its inputs resolved to refs."""
    stage = spec.stages[name]
    task = STAGE_TASKS.get(type(stage))
    if task is None:
        raise TypeError(f"stage '{name}': no task for kind {stage.kind!r}")
    return task(ctx, name, stage, spec.stage_seed(name), **stage_inputs(stage, outputs))


def forced_stages(spec: PipelineSpec, force: list[str]) -> set[str]:
    """The named stages/models and everything downstream of them; unknown names are an error."""
    unknown = [f for f in force if f not in spec.stages and f not in spec.models]
    if unknown:
        known = ", ".join([*spec.models, *spec.stages])
        raise ValueError(f"--force: unknown stage(s) {', '.join(unknown)} (known: {known})")
    forced: set[str] = set()
    for name in force:
        forced |= spec.downstream_of(name)
    return forced
