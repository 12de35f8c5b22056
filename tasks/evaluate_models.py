"""Task: the ``evaluate`` stage (held-out loss/perplexity, verifiable accuracy, sample table)."""

from __future__ import annotations

from prefect import task

from registry import tracking
from registry.datasets import materialize_dataset
from rlhf_core.data.loading import read_jsonl
from rlhf_core.data.synthetic import is_correct
from rlhf_core.fingerprint import evaluate_fingerprint
from rlhf_core.refs import DatasetRef, EvalReportRef, ModelRef
from rlhf_core.spec import EvaluateStage
from tasks.stage_execution import STAGE_TASK_OPTIONS, RunContext, StageOutcome, StageRun, execute_stage

VERIFIERS = {"arithmetic": lambda completion, answer: is_correct(completion, answer)}


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
        from rlhf_core.evaluation.metrics import heldout_loss, verifiable_accuracy
        from rlhf_core.modeling.models import load_model

        cache = run.settings.resolved_home() / "cache"
        eval_rows = read_jsonl(materialize_dataset(data, cache / "datasets") / "eval.jsonl") if data else []
        prompt_rows = (
            read_jsonl(materialize_dataset(prompts, cache / "datasets") / "eval.jsonl")[: stage.max_prompts]
            if prompts
            else []
        )
        unanswered = [i for i, row in enumerate(prompt_rows) if not str(row.get("answer", "")).strip()]
        if unanswered:
            raise ValueError(
                f"stage '{stage_name}', field prompts: {len(unanswered)} row(s) of "
                f"{prompts.stage}.{prompts.kind} (eval split), e.g. row {unanswered[0]} (0-based), have no "
                "'answer'; the verifier needs one"
            )
        scorers = {}
        if stage.best_of_n is not None:
            from rlhf_core.rewards.reward_model_scoring import load_reward_model_scorers

            scorers = load_reward_model_scorers(
                {k: materialize_model(v, cache / "models") for k, v in reward_models.items()}
            )
        report: dict[str, dict[str, float]] = {}
        samples = []
        for name, ref in models.items():
            model, tokenizer = load_model(materialize_model(ref, cache / "models"), revision=ref.revision)
            metrics: dict[str, float] = {}
            if eval_rows:
                metrics.update(heldout_loss(model, tokenizer, eval_rows, max_length=stage.max_length))
            if prompt_rows:
                gen = stage.generation
                acc = verifiable_accuracy(
                    model,
                    tokenizer,
                    prompt_rows,
                    VERIFIERS[stage.verifier],
                    max_new_tokens=gen.max_new_tokens,
                    temperature=gen.temperature,
                    batch_size=gen.batch_size,
                    seed=seed,
                    engine=gen.engine,
                )
                metrics["eval/accuracy"] = acc.accuracy
                samples += [{"model": name, **row} for row in acc.rows[: stage.samples_in_table]]
            if stage.best_of_n is not None:
                metrics.update(
                    best_of_n_metrics(model, tokenizer, prompt_rows, stage, stage_name, seed, scorers)
                )
            report[name] = metrics
            tracking.log_metrics(run.run_id, {f"{name}/{k}": v for k, v in metrics.items()}, step=0)
            run.key_metrics.update(
                {
                    f"{name}.{k.removeprefix('eval/')}": v
                    for k, v in metrics.items()
                    if k in ("eval/loss", "eval/perplexity", "eval/accuracy", "eval/best_of_n/accuracy")
                }
            )
        tracking.log_table(run.run_id, samples, "samples.json")
        tracking.log_dict(run.run_id, report, "report.json")
        return {"report": EvalReportRef(stage=stage_name, metrics=report, run_id=run.run_id)}

    return execute_stage(ctx, stage_name, "evaluate", fingerprint, stage, inputs, body)


def best_of_n_metrics(
    model, tokenizer, prompt_rows, stage: EvaluateStage, stage_name: str, seed: int, scorers
):
    """Sample N per prompt, score with the best_of_n reward sources, pick the top one, verify it."""
    from rlhf_core.rewards.composite import score_completions
    from rlhf_core.rollout.sampling import sample_completions
    from rlhf_core.selection.best_of_n import best_of_n

    spec = stage.best_of_n
    rows, _, _ = sample_completions(model, tokenizer, prompt_rows, spec.n, spec.generation, seed)
    scored, _ = score_completions(rows, spec.rewards, scorers, on_invalid="fail", stage=stage_name)
    verifier = VERIFIERS[stage.verifier]
    result = best_of_n(scored, lambda row: verifier(row["completion"], str(row.get("answer", ""))))
    return result.metrics()
