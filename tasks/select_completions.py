"""Task: the ``rejection_sampling`` stage (keep the best scored completions as an SFT dataset)."""

from __future__ import annotations

from prefect import task

from registry import tracking
from registry.datasets import materialize_dataset
from rlhf_core.data.loading import read_jsonl
from rlhf_core.fingerprint import rejection_sampling_fingerprint
from rlhf_core.refs import DatasetRef
from rlhf_core.selection.rejection_sampling import select_sft_records
from rlhf_core.spec import RejectionSamplingStage
from tasks.dataset_outputs import publish_dataset
from tasks.stage_execution import STAGE_TASK_OPTIONS, RunContext, StageOutcome, StageRun, execute_stage


@task(name="select_completions", **STAGE_TASK_OPTIONS)
def select_completions(
    ctx: RunContext, stage_name: str, stage: RejectionSamplingStage, seed: int, completions: DatasetRef
) -> StageOutcome:
    """Apply the stage's selection rule; the result is an SFT dataset with one ``train`` split."""
    fingerprint = rejection_sampling_fingerprint(stage, seed, completions)

    def body(run: StageRun) -> dict[str, DatasetRef]:
        directory = materialize_dataset(completions, run.settings.resolved_home() / "cache" / "datasets")
        rows = [row for split in completions.splits for row in read_jsonl(directory / f"{split}.jsonl")]
        records, run.key_metrics = select_sft_records(rows, stage, stage_name=stage_name)
        sft = publish_dataset(run, "sft", "sft", {"train": records}, columns=("messages", "reward"))
        tracking.log_metrics(run.run_id, dict(run.key_metrics), step=0)
        return {"sft": sft}

    return execute_stage(
        ctx, stage_name, "rejection_sampling", fingerprint, stage, {"completions": completions}, body
    )
