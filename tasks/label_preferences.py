"""Task: the ``label_preferences`` stage (judge scored completions into preference pairs)."""

from __future__ import annotations

from registry import tracking
from rlhf_core.data.loading import split_records
from rlhf_core.refs import DatasetRef
from rlhf_core.spec import LabelPreferencesStage
from runtime.stage_contract import RunContext, StageCall, StageOutcome, StageRun
from runtime.stage_execution import execute_stage
from runtime.stage_tasks import stage_task
from tasks.dataset_outputs import publish_dataset


@stage_task(LabelPreferencesStage)
def label_preferences(ctx: RunContext, call: StageCall) -> StageOutcome:
    """Score every completion with the judge, pair them per prompt, split the pairs."""
    stage: LabelPreferencesStage = call.stage
    judges = {s.name: call.resolve(s.model) for s in stage.judge if s.model}
    if stage.judge_policy is not None:
        judges["policy"] = call.resolve(stage.judge_policy.model)

    def body(run: StageRun) -> dict[str, DatasetRef]:
        from rlhf_core.judging.labeling import label_preferences as judge  # loads torch when it runs

        completions = call.resolve(stage.completions)
        rows = [row for split in completions.splits for row in run.read_split(completions, split)]
        judge_dirs = {name: run.model_dir(ref) for name, ref in judges.items()}
        revisions = {name: ref.revision for name, ref in judges.items()}
        report, problems = judge(rows, stage, judge_dirs, stage_name=call.name, revisions=revisions)
        if problems:
            tracking.log_text(run.run_id, "\n".join(problems), "invalid_judge_scores.txt")
        splits = split_records(report.pairs, dict(stage.splits), call.seed)
        columns = ("chosen", "margin", "prompt", "rejected")
        preferences = publish_dataset(run, "preferences", "preference", splits, columns=columns)
        run.key_metrics = {
            "pairs": float(len(report.pairs)),
            "invalid_scores": float(len(problems)),
            **{f"dropped_{k}": float(v) for k, v in report.dropped.items()},
        }
        tracking.log_metrics(run.run_id, dict(run.key_metrics), step=0)
        return {"preferences": preferences}

    return execute_stage(ctx, call, body)
