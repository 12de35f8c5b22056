"""Writing, logging and referencing a dataset a stage produced (shared by every dataset-producing stage
after the ``dataset`` stage itself)."""

from __future__ import annotations

from registry import tracking
from rlhf_core.data.loading import directory_digest, write_jsonl
from rlhf_core.refs import DatasetKind, DatasetRef
from runtime.stage_contract import StageRun


def publish_dataset(
    run: StageRun,
    name: str,
    kind: DatasetKind,
    splits: dict[str, list[dict]],
    columns: tuple[str, ...],
) -> DatasetRef:
    """Write each split as ``<work dir>/<name>/<split>.jsonl``, log the folder as the run's artifact
    ``dataset/<name>``, and return the reference that downstream stages resolve."""
    out_dir = run.work_dir / name
    for split, rows in splits.items():
        write_jsonl(rows, out_dir / f"{split}.jsonl")
    uri = tracking.log_artifacts(run.run_id, out_dir, f"dataset/{name}")
    return DatasetRef(
        uri=uri,
        digest=directory_digest(out_dir),
        kind=kind,
        splits={split: len(rows) for split, rows in splits.items()},
        columns=columns,
        stage=run.stage,
        run_id=run.run_id,
    )
