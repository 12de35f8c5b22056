"""Task: the ``evaluate`` stage (held-out loss/perplexity, verifiable accuracy, best-of-N, samples)."""

from __future__ import annotations

from registry import tracking
from rlhf_core.refs import EvalReportRef
from rlhf_core.spec import EvaluateStage
from tasks.registration import stage_task
from tasks.stage_execution import RunContext, StageCall, StageOutcome, StageRun, execute_stage

KEY_METRICS = ("eval/loss", "eval/perplexity", "eval/accuracy", "eval/best_of_n/accuracy")


@stage_task(EvaluateStage)
def evaluate_models(ctx: RunContext, call: StageCall) -> StageOutcome:
    """Evaluate every model on the eval splits; metrics are logged per model as ``<model>/<metric>``.

    With ``best_of_n``, each model also samples N completions per prompt, the reward sources (reward
    functions and/or reward models) pick one, and the verifier checks it.
    """
    stage: EvaluateStage = call.stage

    def body(run: StageRun) -> dict[str, EvalReportRef]:
        from rlhf_core.evaluation.evaluate import evaluate_model  # loads torch only when the stage runs

        data, prompts = (call.resolve(r) if r else None for r in (stage.data, stage.prompts))
        eval_rows = run.read_split(data, "eval") if data else []
        prompt_rows = run.read_split(prompts, "eval") if prompts else []
        sources = (*stage.rewards, *(stage.best_of_n.rewards if stage.best_of_n else ()))
        reward_dirs = {s.name: run.model_dir(call.resolve(s.model)) for s in sources if s.model}
        source = f"{prompts.stage}.{prompts.kind} (eval split)" if prompts else "prompts"
        report, samples = {}, []
        for name in stage.models:
            ref = call.resolve(name)
            metrics, table = evaluate_model(
                run.model_dir(ref), ref.revision, eval_rows, prompt_rows, stage, reward_dirs, call.seed,
                stage_name=call.name, prompts_source=source,
            )  # fmt: skip
            report[name], samples = metrics, samples + [{"model": name, **row} for row in table]
            tracking.log_metrics(run.run_id, {f"{name}/{k}": v for k, v in metrics.items()}, step=0)
            run.key_metrics |= {
                f"{name}.{k.removeprefix('eval/')}": metrics[k] for k in metrics if k in KEY_METRICS
            }
        tracking.log_table(run.run_id, samples, "samples.json")
        tracking.log_dict(run.run_id, report, "report.json")
        return {"report": EvalReportRef(stage=call.name, metrics=report, run_id=run.run_id)}

    return execute_stage(ctx, call, body)
