"""Task: the ``label_preferences`` stage (judge scored completions into preference pairs)."""

from __future__ import annotations

from prefect import task

from registry import tracking
from registry.datasets import materialize_dataset
from rlhf_core.data.loading import read_jsonl, split_records
from rlhf_core.fingerprint import label_preferences_fingerprint
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
        # torch and transformers load only when the stage really runs: cached re-runs skip them.
        from registry.models import materialize_model
        from rlhf_core.judging.labeling import label_preferences as judge

        cache = run.settings.resolved_home() / "cache"
        directory = materialize_dataset(completions, cache / "datasets")
        rows = [row for split in completions.splits for row in read_jsonl(directory / f"{split}.jsonl")]
        judge_dirs = {name: materialize_model(ref, cache / "models") for name, ref in judge_models.items()}
        revisions = {name: ref.revision for name, ref in judge_models.items()}
        report, problems = judge(rows, stage, judge_dirs, stage_name=stage_name, revisions=revisions)
        if problems:
            tracking.log_text(run.run_id, "\n".join(problems), "invalid_judge_scores.txt")
        splits = split_records(report.pairs, dict(stage.splits), seed)
        columns = ("chosen", "margin", "prompt", "rejected")
        preferences = publish_dataset(run, "preferences", "preference", splits, columns=columns)
        run.key_metrics = {
            "pairs": float(len(report.pairs)),
            "invalid_scores": float(len(problems)),
            **{f"dropped_{k}": float(v) for k, v in report.dropped.items()},
        }
        tracking.log_metrics(run.run_id, dict(run.key_metrics), step=0)
        return {"preferences": preferences}

    return execute_stage(ctx, stage_name, "label_preferences", fingerprint, stage, inputs, body)
