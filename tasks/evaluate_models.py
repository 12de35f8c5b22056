"""Task: the ``evaluate`` stage (held-out loss/perplexity, verifiable accuracy, best-of-N, samples)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from registry import tracking
from registry.datasets import materialize_dataset
from rlhf_core.data.loading import read_jsonl
from rlhf_core.fingerprint import evaluate_fingerprint
from rlhf_core.refs import DatasetRef, EvalReportRef, ModelRef
from rlhf_core.spec import EvaluateStage
from tasks.stage_execution import STAGE_TASK_OPTIONS, RunContext, StageOutcome, StageRun, execute_stage

KEY_METRICS = ("eval/loss", "eval/perplexity", "eval/accuracy", "eval/best_of_n/accuracy")


@task(name="evaluate_models", **STAGE_TASK_OPTIONS)
def evaluate_models(
    ctx: RunContext,
    stage_name: str,
    stage: EvaluateStage,
    seed: int,
    models: dict[str, ModelRef],
    data: DatasetRef | None = None,
    prompts: DatasetRef | None = None,
    reward_models: dict[str, ModelRef] | None = None,
) -> StageOutcome:
    """Evaluate every model on the eval splits; metrics are logged per model as ``<model>/<metric>``.

    With ``best_of_n``, each model also samples N completions per prompt, the reward sources (reward
    functions and/or the ``reward_models``) pick one, and the verifier checks it.
    """
    reward_models = reward_models or {}
    inputs: dict = {f"model:{name}": ref for name, ref in models.items()}
    inputs.update({k: v for k, v in {"data": data, "prompts": prompts}.items() if v is not None})
    inputs.update({f"reward:{k}": v for k, v in reward_models.items()})
    fingerprint = evaluate_fingerprint(stage, seed, models, data, prompts, reward_models)

    def body(run: StageRun) -> dict[str, EvalReportRef]:
        # torch and transformers load only when the stage really runs: cached re-runs skip them.
        from registry.models import materialize_model
        from rlhf_core.evaluation.evaluate import evaluate_model

        cache = run.settings.resolved_home() / "cache"
        eval_rows, prompt_rows = _eval_split(data, cache), _eval_split(prompts, cache)
        reward_dirs = {k: materialize_model(v, cache / "models") for k, v in reward_models.items()}
        source = f"{prompts.stage}.{prompts.kind} (eval split)" if prompts else "prompts"
        report: dict[str, dict[str, float]] = {}
        samples: list[dict] = []
        for name, ref in models.items():
            metrics, table = evaluate_model(
                materialize_model(ref, cache / "models"), ref.revision, eval_rows, prompt_rows, stage,
                reward_dirs, seed, stage_name=stage_name, prompts_source=source,
            )  # fmt: skip
            report[name] = metrics
            samples += [{"model": name, **row} for row in table]
            tracking.log_metrics(run.run_id, {f"{name}/{k}": v for k, v in metrics.items()}, step=0)
            shown_keys = [k for k in metrics if k in KEY_METRICS]
            run.key_metrics |= {f"{name}.{k.removeprefix('eval/')}": metrics[k] for k in shown_keys}
        tracking.log_table(run.run_id, samples, "samples.json")
        tracking.log_dict(run.run_id, report, "report.json")
        return {"report": EvalReportRef(stage=stage_name, metrics=report, run_id=run.run_id)}

    return execute_stage(ctx, stage_name, "evaluate", fingerprint, stage, inputs, body)


def _eval_split(ref: DatasetRef | None, cache: Path) -> list[dict]:
    return read_jsonl(materialize_dataset(ref, cache / "datasets") / "eval.jsonl") if ref else []
