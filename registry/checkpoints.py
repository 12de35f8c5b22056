"""Training checkpoints kept with the stage run, so that another machine can resume it.

A stage's checkpoints are written to its local work dir (``rlhf_core.training.engine.checkpoint``). When the
stage runs on a work-pool worker, a crash may send the retry to another machine whose disk does not
have them. So the newest checkpoint is also uploaded as artifacts of the stage run:

    <run artifacts>/checkpoints/step-<N>/...     (the checkpoint directory as written)
    tag rlhf.checkpoint_step = N                  (set only after every file of step-<N> is uploaded)

The tag is the record: a checkpoint whose upload was cut short has no tag pointing at it and is never
downloaded. After the tag moves to step N, older uploaded checkpoints are deleted when the artifact
store can delete (local files, the tracking server's proxied store, S3, GCS, Azure Blob); where it
cannot they stay, and are reported once.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repo import ArtifactRepository
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from registry.tracking import client
from rlhf_core.training.engine.checkpoint import STATE_FILE  # marks a complete checkpoint

CHECKPOINT_TAG = "rlhf.checkpoint_step"
ARTIFACT_DIR = "checkpoints"

_log = logging.getLogger(__name__)


def step_of(checkpoint: Path | str) -> int:
    """The step of a checkpoint directory named ``step-<N>``."""
    name = Path(checkpoint).name
    prefix, _, number = name.partition("-")
    if prefix != "step" or not number.isdigit():
        raise ValueError(f"not a checkpoint directory name: {name!r} (expected step-<N>)")
    return int(number)


def recorded_step(run_id: str) -> int | None:
    """The step of the run's newest completely uploaded checkpoint, or None."""
    text = client().get_run(run_id).data.tags.get(CHECKPOINT_TAG)
    return int(text) if text and text.isdigit() else None


def upload_checkpoint(run_id: str, checkpoint: Path) -> int:
    """Upload ``checkpoint`` (a complete ``step-<N>`` dir), record it, then delete older uploads.

    Returns N. Upload first, tag second: a crash in between leaves the previous record in force."""
    step = step_of(checkpoint)
    if not (checkpoint / STATE_FILE).is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE})")
    repo = _repository(run_id)
    repo.log_artifacts(str(checkpoint), f"{ARTIFACT_DIR}/{checkpoint.name}")
    client().set_tag(run_id, CHECKPOINT_TAG, str(step))
    _delete_uploads(repo, run_id, keep=checkpoint.name)
    return step


def download_checkpoint(run_id: str, directory: Path) -> Path | None:
    """Download the run's recorded checkpoint to ``directory/step-<N>``; None when none is recorded.

    The files arrive in a temporary dir beside the target and are renamed into place when complete, so
    a download cut short never looks like a checkpoint."""
    step = recorded_step(run_id)
    if step is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"step-{step}"
    with tempfile.TemporaryDirectory(prefix=f".step-{step}.download-", dir=directory) as tmp:
        local = Path(_repository(run_id).download_artifacts(f"{ARTIFACT_DIR}/{target.name}", dst_path=tmp))
        if not (local / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"run {run_id}: the uploaded checkpoint {ARTIFACT_DIR}/{target.name} has no {STATE_FILE}"
            )
        shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover of the same step
        os.replace(local, target)
    return target


def delete_checkpoints(run_id: str) -> None:
    """Forget and delete every uploaded checkpoint of the run (the stage finished: nothing to resume)."""
    c = client()
    if CHECKPOINT_TAG in c.get_run(run_id).data.tags:
        c.delete_tag(run_id, CHECKPOINT_TAG)
    _delete_uploads(_repository(run_id), run_id, keep=None)


def uploaded_steps(run_id: str) -> list[int]:
    """Steps of the checkpoints stored with the run (complete or not), oldest first."""
    found = []
    for info in _repository(run_id).list_artifacts(ARTIFACT_DIR):
        try:
            found.append(step_of(info.path))
        except ValueError:
            continue
    return sorted(found)


def _repository(run_id: str) -> ArtifactRepository:
    return get_artifact_repository(client().get_run(run_id).info.artifact_uri)


def _delete_uploads(repo: ArtifactRepository, run_id: str, keep: str | None) -> None:
    """Delete ``checkpoints/*`` except ``keep``; an artifact store that cannot delete is reported once."""
    for info in repo.list_artifacts(ARTIFACT_DIR):
        name = Path(info.path).name
        if name == keep:
            continue
        try:
            repo.delete_artifacts(f"{ARTIFACT_DIR}/{name}")
        except (NotImplementedError, MlflowException) as exc:
            _warn_no_delete(type(repo).__name__, run_id, exc)
            return


_warned_no_delete: set[str] = set()


def _warn_no_delete(repo_kind: str, run_id: str, exc: Exception) -> None:
    if repo_kind in _warned_no_delete:
        return
    _warned_no_delete.add(repo_kind)
    _log.warning(
        "run %s: old uploaded checkpoints cannot be deleted from this artifact store (%s: %s); they stay "
        "under the run's '%s/' artifacts",
        run_id,
        repo_kind,
        exc,
        ARTIFACT_DIR,
    )
