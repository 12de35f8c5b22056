"""Task: the ``label_preferences`` stage (judge scored completions into preference pairs)."""

from __future__ import annotations

from registry import tracking
from rlhf_core.refs import DatasetRef
from rlhf_core.spec import LabelPreferencesStage
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task
from tasks.dataset_outputs import publish_dataset


@stage_task(LabelPreferencesStage)
def label_preferences(call: StageCall, run: StageRun) -> dict[str, DatasetRef]:
    """Score every completion with the judge, pair them per prompt, split the pairs."""
    from rlhf_core.judging import labeling  # loads torch only when the stage runs

    stage: LabelPreferencesStage = call.stage
    judges = {s.name: call.resolve(s.model) for s in stage.judge if s.model}
    if stage.judge_policy is not None:
        judges[labeling.POLICY_JUDGE] = call.resolve(stage.judge_policy.model)
    completions = call.resolve(stage.completions)
    inputs = labeling.LabelingInputs(
        rows=[row for split in completions.splits for row in run.read_split(completions, split)],
        judge_dirs={name: run.model_dir(ref) for name, ref in judges.items()},
        revisions={name: ref.revision for name, ref in judges.items()},
    )
    result = labeling.label_preferences(stage, inputs, run.environment(call.seed))
    if result.problems:
        tracking.log_text(run.run_id, "\n".join(result.problems), "invalid_judge_scores.txt")
    columns = labeling.pair_columns(stage)
    preferences = publish_dataset(run, "preferences", "preference", result.splits, columns=columns)
    run.key_metrics = result.summary()
    tracking.log_metrics(run.run_id, dict(run.key_metrics), step=0)
    return {"preferences": preferences}
