"""Task: the ``rejection_sampling`` stage (keep the best scored completions as an SFT dataset)."""

from __future__ import annotations

from registry import tracking
from rlhf_core.refs import DatasetRef
from rlhf_core.selection.rejection_sampling import select_sft_records
from rlhf_core.spec import RejectionSamplingStage
from runtime.stage_contract import RunContext, StageCall, StageOutcome, StageRun
from runtime.stage_execution import execute_stage
from runtime.stage_tasks import stage_task
from tasks.dataset_outputs import publish_dataset


@stage_task(RejectionSamplingStage)
def select_completions(ctx: RunContext, call: StageCall) -> StageOutcome:
    """Apply the stage's selection rule; the result is an SFT dataset with one ``train`` split."""
    stage: RejectionSamplingStage = call.stage
    completions = call.resolve(stage.completions)

    def body(run: StageRun) -> dict[str, DatasetRef]:
        rows = [row for split in completions.splits for row in run.read_split(completions, split)]
        records, run.key_metrics = select_sft_records(
            rows, stage.strategy, k=stage.k, min_reward=stage.min_reward, stage_name=call.name
        )
        sft = publish_dataset(run, "sft", "sft", {"train": records}, columns=("messages", "reward"))
        tracking.log_metrics(run.run_id, dict(run.key_metrics), step=0)
        return {"sft": sft}

    return execute_stage(ctx, call, body)
