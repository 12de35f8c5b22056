"""Task: the ``rejection_sampling`` stage (keep the best scored completions as an SFT dataset)."""

from __future__ import annotations

import statistics

from prefect import task

from registry import tracking
from registry.datasets import materialize_dataset
from rlhf_core.data.loading import read_jsonl
from rlhf_core.fingerprint import rejection_sampling_fingerprint
from rlhf_core.refs import DatasetRef
from rlhf_core.selection.rejection_sampling import select_completions as select
from rlhf_core.selection.rejection_sampling import to_sft_records
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
        picked = select(rows, stage.strategy, k=stage.k, min_reward=stage.min_reward)
        if not picked:
            raise ValueError(
                f"stage '{stage_name}': the selection kept no completion (min_reward {stage.min_reward})"
            )
        sft = publish_dataset(
            run, "sft", "sft", {"train": to_sft_records(picked)}, columns=("messages", "reward")
        )
        run.key_metrics = {
            "selected": float(len(picked)),
            "candidates": float(len(rows)),
            "selected_reward_mean": statistics.fmean(r["reward"] for r in picked),
            "all_reward_mean": statistics.fmean(r["reward"] for r in rows),
        }
        tracking.log_metrics(run.run_id, dict(run.key_metrics), step=0)
        return {"sft": sft}

    return execute_stage(
        ctx, stage_name, "rejection_sampling", fingerprint, stage, {"completions": completions}, body
    )
