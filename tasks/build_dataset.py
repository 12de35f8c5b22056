"""Task: the ``dataset`` stage (read or generate, validate, split, store in MLflow)."""

from __future__ import annotations

from prefect import task

from registry import tracking
from rlhf_core.data.prepare import prepare_dataset
from rlhf_core.fingerprint import dataset_fingerprint
from rlhf_core.refs import DatasetRef
from rlhf_core.spec import DatasetStage
from tasks.stage_execution import STAGE_TASK_OPTIONS, RunContext, StageOutcome, StageRun, execute_stage


@task(name="build_dataset", **STAGE_TASK_OPTIONS)
def build_dataset(ctx: RunContext, stage_name: str, stage: DatasetStage, seed: int) -> StageOutcome:
    """Produce one DatasetRef per output of the source (``sft``, ``preferences``, ``prompts``)."""
    fingerprint = dataset_fingerprint(stage, seed)

    def body(run: StageRun) -> dict[str, DatasetRef]:
        prepared = prepare_dataset(stage_name, stage, seed, run.work_dir / "data")
        if prepared.problems:
            tracking.log_text(run.run_id, "\n".join(prepared.problems), "rejected_rows.txt")
        outputs = {}
        for name, out in prepared.outputs.items():
            uri = tracking.log_artifacts(run.run_id, out.directory, f"dataset/{name}")
            outputs[name] = DatasetRef(
                uri=uri,
                digest=out.digest,
                kind=out.kind,
                splits=out.splits,
                columns=out.columns,
                stage=stage_name,
                run_id=run.run_id,
            )
            tracking.log_metrics(
                run.run_id, {f"{name}/{split}_rows": n for split, n in out.splits.items()}, step=0
            )
            run.key_metrics[f"{name}_rows"] = float(sum(out.splits.values()))
        run.key_metrics["rejected_rows"] = float(len(prepared.problems))
        return outputs

    return execute_stage(ctx, stage_name, "dataset", fingerprint, stage, {}, body)
