"""Checkpoints in shared storage: a stage retried on another machine resumes where the last one stopped.

Trainers write checkpoints to the stage's local work dir (``<home>/work/<stage>-<fingerprint>/
checkpoints``). While a stage runs, ``uploading`` watches that dir from a background thread and
uploads each new complete checkpoint to the stage's MLflow run (``registry.checkpoints``): only the
newest one (a checkpoint superseded while another uploads is skipped), and the run's tag moves to it
only once all its files are stored. When a stage run is resumed and the recorded checkpoint is newer
than any local one (another machine trained it), ``fetch_checkpoint`` downloads it into the work dir
first. Once the stage succeeded, ``discard_checkpoints`` deletes the uploads, as the local ones are.

Uploading is a setting, ``RLHF_CHECKPOINT_UPLOAD``: ``auto`` (default) uploads when the tracking URI is
an MLflow server (stages may run on several machines), not with the home's own SQLite store (the home
is the one place anyway); ``always``; ``never`` (e.g. when every worker mounts one shared
``RLHF_HOME``, where the work dir itself is shared).

Uploading never fails or stops training: an error is logged and the next checkpoint is tried.
"""

from __future__ import annotations

import contextvars
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from registry import checkpoints
from registry.tracking import is_tracking_server
from rlhf_core.settings import RLHFSettings
from rlhf_core.training.engine.checkpoint import STATE_FILE, latest_checkpoint

POLL_SECONDS = 2.0  # a listing of one small directory: cheap next to a training step
UPLOAD_DIR_PREFIX = ".upload-"  # hard-linked snapshot beside the checkpoints (never named step-N)


def upload_enabled(settings: RLHFSettings) -> bool:
    """Whether this machine uploads checkpoints (``RLHF_CHECKPOINT_UPLOAD``; see the module docstring)."""
    if settings.checkpoint_upload == "auto":
        return is_tracking_server(settings.resolved_tracking_uri())
    return settings.checkpoint_upload == "always"


class CheckpointUploader:
    """Uploads the newest complete checkpoint of ``directory`` to one stage run, from a thread."""

    def __init__(self, run_id: str, directory: Path, stage: str = "", poll_seconds: float = POLL_SECONDS):
        self.run_id, self.directory, self.stage, self.poll_seconds = run_id, directory, stage, poll_seconds
        self.uploaded: int | None = None  # the run's recorded step, once read
        self._known = False
        self._stop = threading.Event()
        self._flush = False
        self._thread = threading.Thread(
            target=contextvars.copy_context().run,  # the Prefect run context: logs go to the stage's run
            args=(self._loop,),
            name=f"rlhf-checkpoint-upload-{stage or run_id[:8]}",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, flush: bool = False) -> None:
        """Stop watching and wait for an upload in progress; ``flush``: upload the newest checkpoint
        first if it is not stored yet (a failed stage: its retry may run elsewhere)."""
        self._flush = flush
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.sync_once()
        if self._flush:
            self.sync_once()

    def sync_once(self) -> int | None:
        """Upload the newest local checkpoint if it is newer than the run's record; its step, or None."""
        try:
            newest = latest_checkpoint(self.directory)
            if newest is None:  # a stage that writes no checkpoints costs no tracking calls
                return None
            if not self._known:  # never overwrite the recorded checkpoint (e.g. the one just downloaded)
                self.uploaded, self._known = checkpoints.recorded_step(self.run_id), True
            if self.uploaded is not None and checkpoints.step_of(newest) <= self.uploaded:
                return None
            started = time.perf_counter()
            with _snapshot(newest) as snapshot:
                if snapshot is None:  # pruned by the trainer meanwhile: a newer one is there
                    return None
                self.uploaded = checkpoints.upload_checkpoint(self.run_id, snapshot)
        except Exception as exc:  # noqa: BLE001 - uploading must never stop training
            _logger().warning("stage %s: could not upload a checkpoint (%s); will try again", self.stage, exc)
            return None
        _logger().info(
            "stage %s: checkpoint step-%d stored with run %s (%.1f s)",
            self.stage,
            self.uploaded,
            self.run_id,
            time.perf_counter() - started,
        )
        return self.uploaded


@contextmanager
def uploading(settings: RLHFSettings, run_id: str, directory: Path, stage: str) -> Iterator[None]:
    """Upload new checkpoints of ``directory`` while the block runs (when ``upload_enabled``).

    The thread is stopped and joined when the block ends; when the block raised an error, the newest
    checkpoint is uploaded first if it is not stored yet."""
    if not upload_enabled(settings):
        yield
        return
    uploader = CheckpointUploader(run_id, directory, stage, POLL_SECONDS)
    uploader.start()
    try:
        yield
    except Exception:
        uploader.stop(flush=True)
        raise
    except BaseException:
        uploader.stop()
        raise
    uploader.stop()


def fetch_checkpoint(run_id: str, directory: Path, stage: str) -> Path | None:
    """Download the run's uploaded checkpoint into ``directory`` when it is newer than every local one.

    Returns the downloaded checkpoint, or None (nothing newer recorded, or the download failed: then the
    stage resumes from a local checkpoint if there is one, else starts over)."""
    local = latest_checkpoint(directory)
    try:
        step = checkpoints.recorded_step(run_id)
        if step is None or (local is not None and checkpoints.step_of(local) >= step):
            return None
        started = time.perf_counter()
        path = checkpoints.download_checkpoint(run_id, directory)
    except Exception as exc:  # noqa: BLE001 - starting over is slower, never wrong
        _logger().warning("stage %s: could not download the checkpoint of run %s: %s", stage, run_id, exc)
        return None
    if path is not None:
        _logger().info(
            "stage %s: downloaded checkpoint %s of run %s (%.1f s)",
            stage,
            path.name,
            run_id,
            time.perf_counter() - started,
        )
    return path


def discard_checkpoints(run_id: str, stage: str) -> None:
    """Delete the checkpoints uploaded with a stage run that finished (errors are only logged)."""
    try:
        checkpoints.delete_checkpoints(run_id)
    except Exception as exc:  # noqa: BLE001 - the stage succeeded; leftovers only cost storage
        _logger().warning(
            "stage %s: could not delete the uploaded checkpoints of run %s: %s", stage, run_id, exc
        )


@contextmanager
def _snapshot(checkpoint: Path) -> Iterator[Path | None]:
    """``checkpoint`` hard-linked into a dir of its own (no data copied): the trainer may prune the
    original (it keeps the newest few) while this one uploads. None when it was pruned before linking."""
    staging = checkpoint.parent / f"{UPLOAD_DIR_PREFIX}{checkpoint.name}"
    target = staging / checkpoint.name  # same name: the upload takes the step from it
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(checkpoint, target, copy_function=_link_or_copy)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if (checkpoint / STATE_FILE).exists():
            raise
        yield None
        return
    try:
        # Checkpoint files are never rewritten in place, so the links hold what was saved; if the
        # directory is already gone, it may have been pruned while it was being linked.
        yield target if (checkpoint / STATE_FILE).exists() else None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        if not os.path.exists(src):
            raise
        shutil.copy2(src, dst)  # a file system without hard links


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("rlhf")
