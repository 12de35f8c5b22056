"""Task: the ``label_preferences`` stage (judge scored completions into preference pairs)."""

from __future__ import annotations

from prefect import task

from registry import tracking
from registry.datasets import materialize_dataset
from rlhf_core.data.loading import read_jsonl, split_records
from rlhf_core.fingerprint import label_preferences_fingerprint
from rlhf_core.preferences import candidate_pairs, label_pairs, pairs_from_verdicts
from rlhf_core.refs import DatasetRef, ModelRef
from rlhf_core.spec import LabelPreferencesStage
from tasks.dataset_outputs import publish_dataset
from tasks.stage_execution import STAGE_TASK_OPTIONS, RunContext, StageOutcome, StageRun, execute_stage


@task(name="label_preferences", **STAGE_TASK_OPTIONS)
def label_preferences(
    ctx: RunContext,
    stage_name: str,
    stage: LabelPreferencesStage,
    seed: int,
    completions: DatasetRef,
    judge_models: dict[str, ModelRef],
) -> StageOutcome:
    """Score every completion with the judge, pair them per prompt, split the pairs."""
    inputs = {"completions": completions, **{f"judge:{k}": v for k, v in judge_models.items()}}
    fingerprint = label_preferences_fingerprint(stage, seed, completions, judge_models)

    def body(run: StageRun) -> dict[str, DatasetRef]:
        cache = run.settings.resolved_home() / "cache"
        directory = materialize_dataset(completions, cache / "datasets")
        rows = [row for split in completions.splits for row in read_jsonl(directory / f"{split}.jsonl")]
        if stage.judge_policy is not None:
            report, problems = _judge_with_policy(rows, judge_models["policy"], cache), []
        else:
            report, problems = _judge_with_rewards(rows, cache)
        if not report.pairs:
            raise ValueError(
                f"stage '{stage_name}': no preference pair left (dropped: {dict(report.dropped)})"
            )
        splits = split_records(report.pairs, dict(stage.splits), seed)
        if problems:
            tracking.log_text(run.run_id, "\n".join(problems), "invalid_judge_scores.txt")
        preferences = publish_dataset(
            run, "preferences", "preference", splits, columns=("chosen", "margin", "prompt", "rejected")
        )
        run.key_metrics = {
            "pairs": float(len(report.pairs)),
            "invalid_scores": float(len(problems)),
            **{f"dropped_{k}": float(v) for k, v in report.dropped.items()},
        }
        tracking.log_metrics(run.run_id, dict(run.key_metrics), step=0)
        return {"preferences": preferences}

    def _judge_with_rewards(rows: list[dict], cache):
        from registry.models import materialize_model
        from rlhf_core.rewards.composite import score_completions
        from rlhf_core.rewards.reward_model_scoring import load_reward_model_scorers

        scorers = load_reward_model_scorers(
            {k: materialize_model(v, cache / "models") for k, v in judge_models.items()}
        )
        judged, problems = score_completions(rows, stage.judge, scorers, on_invalid="skip", stage=stage_name)
        scored = [{**r, "judge_score": r["reward"]} for r in judged]
        return label_pairs(
            scored, pairing=stage.pairing, min_margin=stage.min_margin, on_tie=stage.on_tie, stage=stage_name
        ), problems

    def _judge_with_policy(rows: list[dict], ref: ModelRef, cache):
        from registry.models import materialize_model
        from rlhf_core.judging import judge_pairs
        from rlhf_core.modeling.models import load_model
        from rlhf_core.rollout.generation import generate_completions

        spec = stage.judge_policy
        model, tokenizer = load_model(materialize_model(ref, cache / "models"), revision=ref.revision)
        pairs = candidate_pairs(rows, stage.pairing)
        verdicts = judge_pairs(
            lambda prompts: generate_completions(
                model, tokenizer, prompts, max_new_tokens=spec.max_new_tokens
            ),
            spec.principles,
            pairs,
        )
        return pairs_from_verdicts(
            pairs, verdicts, on_tie=stage.on_tie, on_judge_error=spec.on_unparseable, stage=stage_name
        )

    return execute_stage(ctx, stage_name, "label_preferences", fingerprint, stage, inputs, body)
