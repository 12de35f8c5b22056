"""Task: the ``dataset`` stage (read or generate, validate, split, store in MLflow)."""

from __future__ import annotations

from registry import tracking
from rlhf_core.dataset_preparation import prepare_dataset
from rlhf_core.refs import DatasetRef
from rlhf_core.spec import DatasetStage
from runtime.stage_contract import RunContext, StageCall, StageOutcome, StageRun
from runtime.stage_execution import execute_stage
from runtime.stage_tasks import stage_task


@stage_task(DatasetStage)
def build_dataset(ctx: RunContext, call: StageCall) -> StageOutcome:
    """Produce one DatasetRef per output of the source (``sft``, ``preferences``, ``prompts``)."""

    def body(run: StageRun) -> dict[str, DatasetRef]:
        prepared = prepare_dataset(call.name, call.stage, call.seed, run.work_dir / "data")
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
            run.key_metrics[f"{name}_rows"] = float(sum(out.splits.values()))
        run.key_metrics["rejected_rows"] = float(len(prepared.problems))
        return outputs

    return execute_stage(ctx, call, body)
