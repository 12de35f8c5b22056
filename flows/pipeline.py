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
    resolve_ref,
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


def run_stage(
    ctx: RunContext, spec: PipelineSpec, name: str, outputs: dict[str, dict[str, StageOutput]]
) -> StageOutcome:
    """Call the task of a stage's kind with its inputs resolved to refs."""
    stage = spec.stages[name]
    seed = spec.stage_seed(name)
    if isinstance(stage, DatasetStage):
        return build_dataset(ctx, name, stage, seed)
    if isinstance(stage, SFTStage):
        return train_sft(
            ctx,
            name,
            stage,
            seed,
            model=resolve_ref(stage.model, outputs),
            data=resolve_ref(stage.data, outputs),
        )
    if isinstance(stage, RewardModelStage):
        return train_reward_model(
            ctx,
            name,
            stage,
            seed,
            model=resolve_ref(stage.model, outputs),
            data=resolve_ref(stage.data, outputs),
        )
    if isinstance(stage, SampleStage):
        return sample_completions(
            ctx,
            name,
            stage,
            seed,
            policy=resolve_ref(stage.policy, outputs),
            prompts=resolve_ref(stage.prompts, outputs),
            reward_models={
                s.name: resolve_ref(s.model, outputs) for s in stage.rewards if s.model is not None
            },
        )
    if isinstance(stage, RejectionSamplingStage):
        return select_completions(ctx, name, stage, seed, completions=resolve_ref(stage.completions, outputs))
    if isinstance(stage, LabelPreferencesStage):
        judges = {s.name: resolve_ref(s.model, outputs) for s in stage.judge if s.model is not None}
        if stage.judge_policy is not None:
            judges["policy"] = resolve_ref(stage.judge_policy.model, outputs)
        return label_preferences(
            ctx, name, stage, seed, completions=resolve_ref(stage.completions, outputs), judge_models=judges
        )
    if isinstance(stage, EvaluateStage):
        return evaluate_models(
            ctx,
            name,
            stage,
            seed,
            models={m: resolve_ref(m, outputs) for m in stage.models},
            data=resolve_ref(stage.data, outputs) if stage.data else None,
            prompts=resolve_ref(stage.prompts, outputs) if stage.prompts else None,
            reward_models={
                s.name: resolve_ref(s.model, outputs)
                for s in (stage.best_of_n.rewards if stage.best_of_n else ())
                if s.model is not None
            },
        )
    raise TypeError(f"stage '{name}': no task for kind {stage.kind!r}")


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
