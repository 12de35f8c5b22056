"""Task: the ``evaluate`` stage (candidates vs a baseline: NLL, accuracy, pass@k, reward means, win rates,
KL to the reference, lengths, best-of-N; every figure with a bootstrap interval)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from registry import model_metrics, tracking
from registry.model_cards import refresh_model_card
from rlhf_core.refs import EvalReportRef, ModelRef
from rlhf_core.spec import EvaluateStage
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task


@stage_task(EvaluateStage)
def evaluate_models(call: StageCall, run: StageRun) -> dict[str, EvalReportRef]:
    """Evaluate every model on the eval splits and compare each with the baseline.

    Metrics are logged per model as ``<model>/<metric>`` on the stage run and, for registered models,
    against the model's logged model (the registry's version page shows them). Artifacts: report.json,
    report.md (the table), samples.json and plots/*.png; in a Prefect run also a markdown artifact with
    the table (key ``<pipeline>-<stage>-report``).
    """
    from rlhf_core.evaluation.comparison import EvaluationInputs, compare_models  # loads torch when it runs
    from rlhf_core.evaluation.report_table import report_markdown

    stage: EvaluateStage = call.stage
    data, prompts = (call.resolve(r) if r else None for r in (stage.data, stage.prompts))
    refs: dict[str, ModelRef] = {name: call.resolve(name) for name in stage.models}
    inputs = EvaluationInputs(
        models={name: (run.model_dir(ref), ref.revision) for name, ref in refs.items()},
        eval_rows=run.read_split(data, "eval") if data else [],
        prompt_rows=run.read_split(prompts, "eval") if prompts else [],
        reward_model_dirs=_reward_model_dirs(run, call),
        judge_models=_judge_models(run, call),
        reference=_location(run, call, stage.kl_reference),
        prompts_source=f"{prompts.stage}.{prompts.kind} (eval split)" if prompts else "prompts",
    )
    result = compare_models(stage, inputs, run.environment(call.seed))
    report = result.report
    measured = []  # registered versions whose logged model holds the figures
    for name, metrics in report.items():
        keyed = {f"{name}/{k}": v for k, v in metrics.items()}
        if not model_metrics.log_model_metrics(run.run_id, refs[name].uri, keyed):  # not registered
            tracking.log_metrics(run.run_id, keyed, step=0)
        elif refs[name].registered_name:
            measured.append(refs[name])
    run.key_metrics = result.summary()
    table = report_markdown(
        report, baseline=stage.baseline, reference=stage.kl_reference, title=f"Evaluation: {call.name}"
    )
    tracking.log_table(run.run_id, result.samples, "samples.json")
    tracking.log_dict(run.run_id, report, "report.json")
    tracking.log_text(run.run_id, table, "report.md")
    _log_plots(run, report, stage.baseline)
    for ref in measured:  # each version's card shows its evaluation figures and the plots drawn
        refresh_model_card(ref.registered_name, ref.registered_version)
    _publish_table(run, table)
    return {"report": EvalReportRef(stage=call.name, metrics=report, run_id=run.run_id)}


def _location(run: StageRun, call: StageCall, name: str | None) -> tuple[str, str | None] | None:
    if name is None:
        return None
    ref = call.resolve(name)
    return run.model_dir(ref), ref.revision


def _reward_model_dirs(run: StageRun, call: StageCall) -> dict[str, str]:
    """Reward models of the rewards, best-of-N (proxy and gold) and win-rate judges, by source name
    (``rm:<stage>``)."""
    stage: EvaluateStage = call.stage
    best = (*stage.best_of_n.rewards, *stage.best_of_n.gold) if stage.best_of_n else ()
    sources = [*stage.rewards, *best]
    sources += [j.reward_source() for j in (stage.win_rate.judges if stage.win_rate else ())]
    return {s.name: run.model_dir(call.resolve(s.model)) for s in sources if s is not None and s.model}


def _judge_models(run: StageRun, call: StageCall) -> dict[str, tuple[str, str | None]]:
    stage: EvaluateStage = call.stage
    judges = stage.win_rate.judges if stage.win_rate else ()
    return {j.name: _location(run, call, j.policy.model) for j in judges if j.policy is not None}  # type: ignore[misc]


def _log_plots(run: StageRun, report: dict[str, dict[str, float]], baseline: str | None) -> None:
    from rlhf_core.evaluation.plots import write_plots

    with tempfile.TemporaryDirectory(prefix="rlhf-eval-plots-") as tmp:
        if write_plots(report, Path(tmp), baseline=baseline):
            tracking.log_artifacts(run.run_id, Path(tmp), "plots")


def _publish_table(run: StageRun, table: str) -> None:
    """The report table as a Prefect markdown artifact of the task run (nothing outside a Prefect run)."""
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None:
        return
    key = re.sub(r"[^a-z0-9-]+", "-", f"{run.pipeline}-{run.stage}-report".lower()).strip("-")
    try:
        create_markdown_artifact(
            markdown=table,
            key=key,
            description=f"Evaluation report of stage {run.stage} (MLflow run {run.run_id})",
        )
    except Exception as exc:  # the report is in MLflow already; a Prefect API hiccup must not fail the stage
        get_run_logger().warning("stage %s: could not create the report artifact: %s", run.stage, exc)
