"""Task: the ``rejection_sampling`` stage (keep the best scored completions as an SFT dataset)."""

from __future__ import annotations

from registry import tracking
from rlhf_core.refs import DatasetRef
from rlhf_core.selection.rejection_sampling import SelectionInputs, select_sft_records
from rlhf_core.spec import RejectionSamplingStage
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task
from tasks.dataset_outputs import publish_dataset


@stage_task(RejectionSamplingStage)
def select_completions(call: StageCall, run: StageRun) -> dict[str, DatasetRef]:
    """Apply the stage's selection rule; the result is an SFT dataset with one ``train`` split."""
    stage: RejectionSamplingStage = call.stage
    completions = call.resolve(stage.completions)
    rows = [row for split in completions.splits for row in run.read_split(completions, split)]
    selection = select_sft_records(stage, SelectionInputs(rows), run.environment(call.seed))
    sft = publish_dataset(run, "sft", "sft", {"train": selection.records}, columns=("messages", "reward"))
    run.key_metrics = selection.summary()
    tracking.log_metrics(run.run_id, dict(run.key_metrics), step=0)
    return {"sft": sft}
