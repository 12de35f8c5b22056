"""Task: the ``dataset`` stage (read or generate, validate, split, store in MLflow)."""

from __future__ import annotations

from registry import tracking
from rlhf_core.dataset_preparation import prepare_dataset
from rlhf_core.refs import DatasetRef
from rlhf_core.spec import DatasetStage
from rlhf_core.stage_environment import NoInputs
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task


@stage_task(DatasetStage)
def build_dataset(call: StageCall, run: StageRun) -> dict[str, DatasetRef]:
    """Produce one DatasetRef per output of the source (``sft``, ``preferences``, ``prompts``)."""
    prepared = prepare_dataset(call.stage, NoInputs(), run.environment(call.seed))
    if prepared.problems:
        tracking.log_text(run.run_id, "\n".join(prepared.problems), "rejected_rows.txt")
    outputs = {}
    for name, out in prepared.outputs.items():
        uri = tracking.log_artifacts(run.run_id, out.directory, f"dataset/{name}")
        outputs[name] = DatasetRef(
            uri=uri, digest=out.digest, kind=out.kind, splits=out.splits, columns=out.columns,
            stage=call.name, run_id=run.run_id,
        )  # fmt: skip
        tracking.log_metrics(
            run.run_id, {f"{name}/{split}_rows": n for split, n in out.splits.items()}, step=0
        )
    run.key_metrics = prepared.summary()
    return outputs
