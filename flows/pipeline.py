"""The pipeline flow: a PipelineSpec compiled into Prefect tasks, one per stage, in DAG order.

Walkthrough of one run:
1. name the Prefect flow run after the pipeline (``<pipeline>-<spec digest[:8]>-<time>-<run id[:8]>``)
   and tag it ``pipeline:<name>`` and ``spec:<digest[:12]>``;
2. open the MLflow experiment of the pipeline and a parent run (tags: Prefect flow run, spec digest,
   git commit; params: pipeline, seed, spec digest, stages and their kinds and seeds; the spec's
   description and stage list as its description); log the resolved spec;
3. materialize each base model under ``models:``;
4. run the stages in topological order: for each, resolve its inputs to refs and compute its
   fingerprint (``flows.stage_calls``), then call the task registered for its kind (its task run is
   named after the stage), which returns a ``StageOutcome`` (ran / resumed / cached, metrics, MLflow
   run, registered version) and leaves a markdown artifact with its results. A stage whose
   ``compute`` names a work pool is submitted there instead (``flows.dispatch``) as soon as its inputs
   exist, so branches on pools run at the same time;
5. close the parent run (FAILED if any stage failed) with each stage's key metrics as
   ``<stage>/<metric>``, the results in its description and, per stage, a tag ``stage.<name>`` naming
   the run that holds its outputs (and its pipeline, when another pipeline's run was reused), and
   return the outcomes.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.context import FlowRunContext
from prefect.runtime import flow_run

from flows.code_version import code_commit
from flows.stage_calls import BASE_MODEL_KIND, base_model_call, stage_call
from registry import tracking
from registry.lineage import check_registered_models
from rlhf_core.errors import UserError
from rlhf_core.refs import StageOutput
from rlhf_core.settings import RLHFSettings
from rlhf_core.spec import PipelineSpec, load_spec
from rlhf_core.spec.loading import apply_spec_overrides, find_profile_file, resolve_profile, resolve_spec
from runtime import stage_reports
from runtime.stage_contract import RunContext, StageOutcome
from runtime.stage_tasks import task_for_kind


def flow_run_name() -> str:
    """The running flow's name (``pipeline_run_name`` of its spec, overrides and id)."""
    spec = _spec_parameter()
    if spec is None:
        return f"rlhf-pipeline-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{str(flow_run.get_id() or '')[:8]}"
    return pipeline_run_name(spec, flow_run.parameters.get("overrides"), flow_run.get_id(), datetime.now())


def pipeline_run_name(
    spec: PipelineSpec, overrides: dict[str, Any] | None, run_id: str | None, now: datetime
) -> str:
    """``<pipeline>-<spec digest[:8]>-<YYYYmmdd-HHMMSS>-<flow run id[:8]>``: runs of one pipeline sort
    together by time. The digest is the spec's with the run's overrides applied (what runs), and the
    flow run's short id keeps apart two runs of one deployment started in the same second."""
    try:
        digest = apply_spec_overrides(spec, overrides).digest()
    except UserError:  # the flow itself reports a bad override; the name just shows the deployed spec
        digest = spec.digest()
    name = f"{spec.name}-{digest[:8]}-{now.strftime('%Y%m%d-%H%M%S')}"
    return f"{name}-{str(run_id)[:8]}" if run_id else name


def _spec_parameter() -> PipelineSpec | None:
    spec = flow_run.parameters.get("spec")
    if isinstance(spec, dict):  # a deployment's run gets its parameters as JSON
        spec = PipelineSpec.model_validate(spec)
    return spec if isinstance(spec, PipelineSpec) else None


def flow_run_tags(spec: PipelineSpec, spec_digest: str) -> list[str]:
    return [f"pipeline:{spec.name}", f"spec:{spec_digest[:12]}"]


def _tag_flow_run(tags: list[str]) -> None:
    """Add ``tags`` to the running flow run (a flow's tags are otherwise fixed when its run is created)."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    merged = sorted({*(context.flow_run.tags or []), *tags})
    try:
        context.client.update_flow_run(context.flow_run.id, tags=merged)
    except Exception as exc:  # noqa: BLE001 - tags help finding a run; they never stop one
        print(f"could not tag the flow run: {exc}")


def pipeline_params(spec: PipelineSpec, spec_digest: str, forced: tuple[str, ...]) -> dict:
    """The parent run's params: what a person compares between pipeline runs."""
    stages = spec.topological_order()
    return {
        "pipeline": spec.name,
        "seed": spec.seed,
        "spec_digest": spec_digest,
        "models": ", ".join(spec.models),
        "stages": ", ".join(f"{n}:{spec.stages[n].kind}" for n in stages),
        "stage": {n: {"kind": spec.stages[n].kind, "seed": spec.stage_seed(n)} for n in stages},
        "force": ", ".join(forced),
    }


@flow(name="rlhf-pipeline", flow_run_name=flow_run_name, log_prints=True)
def run_pipeline(
    spec: PipelineSpec | str,
    force: list[str] | None = None,
    home: str = ".rlhf",
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
) -> list[StageOutcome]:
    """Run every stage of ``spec``; stages whose fingerprint is already in MLflow are taken from cache.

    ``spec`` is a spec or the path of a spec file (as a deployment made from ``prefect.yaml`` gives
    it). ``force`` names stages (or models) to re-run together with everything downstream of them.
    ``overrides`` sets spec values by path (``stages.sft.train.lr``), as the form of a deployed
    pipeline in the Prefect UI does (``flows.deploy``). ``profile`` names a compute profile (from the
    ``profiles.yaml`` next to a spec file, or in the working directory; ``rlhf_core.spec.loading``).
    """
    spec_path = spec if isinstance(spec, str) else "spec.yaml"
    if isinstance(spec, str):
        spec = load_spec(spec)
    if profile is not None:
        spec = spec.with_profile(resolve_profile(profile, find_profile_file(spec_path)), profile)
    spec = resolve_spec(apply_spec_overrides(spec, overrides))  # the values that run and are logged
    settings = RLHFSettings(home=Path(home))
    tracking.configure(settings)
    check_registered_models(spec)  # before any stage runs or registers anything
    experiment_id = tracking.ensure_experiment(spec.name, settings)
    commit = code_commit()  # a worker runs outside git: the deployment's version names the commit
    spec_digest = spec.digest()
    flow_run_id = str(flow_run.get_id() or "")
    _tag_flow_run(flow_run_tags(spec, spec_digest))
    prefect_url = stage_reports.prefect_flow_run_url(flow_run_id) if flow_run_id else None
    parent = tracking.start_pipeline_run(
        experiment_id,
        spec.name,
        {
            "prefect.flow_run_id": flow_run_id,
            **({"prefect.flow_run_url": prefect_url} if prefect_url else {}),
            "rlhf.spec_digest": spec_digest,
            "rlhf.git_commit": commit,
        },
    )
    forced = tuple(sorted(forced_stages(spec, force or [])))
    description = stage_reports.pipeline_description(spec, spec_digest, prefect_url)
    tracking.set_description(parent, description)
    tracking.log_params(parent, pipeline_params(spec, spec_digest, forced))
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
        forced=forced,
        tracking_uri=settings.resolved_tracking_uri(),
    )
    outcomes: list[StageOutcome] = []
    try:
        outputs: dict[str, dict[str, StageOutput]] = {}
        for name in spec.models:
            outcome = task_for_kind(BASE_MODEL_KIND)(ctx, base_model_call(spec, name))
            outputs[name] = outcome.outputs
            outcomes.append(outcome)
        run_stages(ctx, spec, outputs, outcomes, key_prefix=flow_run_id or parent)
    except BaseException as exc:
        failure = f"{type(exc).__name__}: {exc}"
        _record_results(ctx, description, outcomes, failure)
        tracking.end_run(parent, "FAILED")
        raise
    tracking.set_tags(parent, {f"stage.{o.stage}": stage_record_tag(o) for o in outcomes})
    _record_results(ctx, description, outcomes)
    tracking.end_run(parent, "FINISHED")
    return outcomes


def stage_record_tag(outcome: StageOutcome) -> str:
    """The parent run's ``stage.<name>`` tag: which run holds the stage's outputs (``registry.lineage``
    reads it back), e.g. ``cached run=<id>``, or ``cached run=<id> pipeline=quickstart experiment=1
    pipeline_run=<id>`` for a run of another pipeline."""
    text = f"{outcome.status} run={outcome.run_id}"
    if (origin := outcome.origin) is not None:
        text += f" pipeline={origin.pipeline} experiment={origin.experiment_id}"
        text += f" pipeline_run={origin.pipeline_run_id}" if origin.pipeline_run_id else ""
    return text


def run_stages(
    ctx: RunContext,
    spec: PipelineSpec,
    outputs: dict[str, dict[str, StageOutput]],
    outcomes: list[StageOutcome],
    key_prefix: str,
) -> None:
    """Run every stage once its inputs exist, appending to ``outputs`` and ``outcomes`` as they finish.

    In-process stages run one at a time, here. A stage whose ``compute`` names a work pool is submitted
    (``flows.dispatch``) as soon as its inputs exist and waited for in a thread, so independent branches
    on pools run at the same time as each other and as the in-process stages.
    """
    from prefect.futures import as_completed

    from flows.dispatch import dispatch_stage

    order = spec.topological_order()
    started: set[str] = set()
    running: dict = {}  # future of a dispatched stage -> stage name

    def ready(name: str) -> bool:
        return name not in started and all(dep in outputs for dep in spec.dependencies(name))

    def record(outcome: StageOutcome) -> None:
        outputs[outcome.stage] = outcome.outputs
        outcomes.append(outcome)

    while True:
        for future in [f for f in running if f.state.is_final()]:  # finished while a local stage ran
            running.pop(future)
            record(future.result())
        if len(started) == len(order) and not running:  # checked after collecting: a future may just end
            break
        for name in order:
            if ready(name) and spec.compute_of(name).dispatched:
                call = stage_call(spec, name, outputs)  # inputs resolved and checked, fingerprint computed
                running[dispatch_stage.submit(ctx, call, spec.compute_of(name), key_prefix)] = name
                started.add(name)
        local = next((name for name in order if ready(name)), None)
        if local is not None:
            started.add(local)
            call = stage_call(spec, local, outputs)
            record(task_for_kind(call.kind)(ctx, call))
        elif running:
            future = next(iter(as_completed(list(running))))
            running.pop(future)
            record(future.result())
        else:  # nothing runs and nothing can start: an input that no stage produces (checked at load)
            missing = [n for n in order if n not in started]
            raise RuntimeError(f"stages {missing} can never start: their inputs are not produced")
    outcomes.sort(
        key=lambda o: (o.stage in spec.stages, order.index(o.stage) if o.stage in spec.stages else 0)
    )


def _record_results(
    ctx: RunContext, description: str, outcomes: list[StageOutcome], failure: str | None = None
) -> None:
    """The parent run's metrics and description gain the results; the flow run gets a summary artifact.

    Never raises: on the failure path it must not hide the stage's own error.
    """
    try:
        results = stage_reports.results_markdown(outcomes, ctx.experiment_id, failure)
        tracking.log_metrics(ctx.parent_run_id, stage_reports.summary_metrics(outcomes), step=0)
        tracking.set_description(ctx.parent_run_id, description + results)
    except Exception as exc:  # noqa: BLE001
        print(f"could not record the results on the parent run: {exc}")
        return
    base = tracking.ui_base_url(ctx.settings())
    parent_link = tracking.ui_url(base, tracking.run_page(ctx.experiment_id, ctx.parent_run_id))
    stage_reports.create_markdown_artifact(
        f"## Pipeline `{ctx.pipeline}`\n\nMLflow parent run: [{ctx.parent_run_id}]({parent_link})\n"
        + stage_reports.absolute_links(results, base),
        key=stage_reports.artifact_key(ctx.pipeline, "summary"),
        description=f"pipeline {ctx.pipeline}: "
        + ("failed" if failure else f"{len(outcomes)} stage(s) done"),
    )


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
