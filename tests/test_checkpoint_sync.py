"""Checkpoints kept with the stage run (registry.checkpoints, runtime.checkpoint_sync), on a local store.

No training here: a checkpoint is a ``step-<N>`` dir with ``trainer_state.json`` and a weights file,
as ``rlhf_core.training.engine.checkpoint`` writes it. The store is the home's SQLite store with file
artifacts; the tracking-server path is covered by ``test_checkpoint_sync_e2e.py``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest

from registry import checkpoints
from rlhf_core.settings import RLHFSettings
from runtime import checkpoint_sync


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from registry import tracking

    settings = RLHFSettings(home=tmp_path_factory.mktemp("ckpt-home"))
    tracking.configure(settings)
    experiment = tracking.ensure_experiment("checkpoints", settings)
    return settings, experiment


@pytest.fixture
def run_id(store):
    from registry import tracking

    settings, experiment = store
    tracking.configure(settings)  # other tests may have pointed MLflow elsewhere
    return tracking.start_stage_run(experiment, tracking.start_pipeline_run(experiment, "c", {}), "sft", {})


def _checkpoint(directory: Path, step: int, payload: bytes | None = None) -> Path:
    path = directory / f"step-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(payload or f"weights at {step}".encode())
    (path / "random_states_0.pkl").write_bytes(b"rng")
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_upload_record_download_round_trip(run_id, tmp_path):
    source = _checkpoint(tmp_path / "a", 4)
    assert checkpoints.recorded_step(run_id) is None
    assert checkpoints.download_checkpoint(run_id, tmp_path / "b") is None

    assert checkpoints.upload_checkpoint(run_id, source) == 4
    assert checkpoints.recorded_step(run_id) == 4
    got = checkpoints.download_checkpoint(run_id, tmp_path / "b")
    assert got == tmp_path / "b" / "step-4"
    assert _files(got) == _files(source)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["step-4"]  # no temporary dir left


def test_a_newer_upload_deletes_the_older_one(run_id, tmp_path):
    checkpoints.upload_checkpoint(run_id, _checkpoint(tmp_path, 4))
    checkpoints.upload_checkpoint(run_id, _checkpoint(tmp_path, 8))
    assert checkpoints.uploaded_steps(run_id) == [8]
    assert checkpoints.recorded_step(run_id) == 8

    checkpoints.delete_checkpoints(run_id)
    assert checkpoints.uploaded_steps(run_id) == []
    assert checkpoints.recorded_step(run_id) is None


def test_an_upload_cut_short_is_never_used(run_id, tmp_path, monkeypatch):
    """The upload of step-12 dies after one file: the record still names step-8, and step-8 is what a
    new machine downloads."""
    old = _checkpoint(tmp_path, 8, b"good weights")
    checkpoints.upload_checkpoint(run_id, old)
    repo_class = type(checkpoints._repository(run_id))
    real_log_artifact = repo_class.log_artifact

    def log_artifacts_then_die(self, local_dir, artifact_path=None):
        real_log_artifact(self, str(Path(local_dir) / "model.safetensors"), artifact_path)
        raise ConnectionError("connection reset while uploading")

    monkeypatch.setattr(repo_class, "log_artifacts", log_artifacts_then_die)
    with pytest.raises(ConnectionError):
        checkpoints.upload_checkpoint(run_id, _checkpoint(tmp_path, 12, b"half"))
    monkeypatch.undo()

    assert checkpoints.uploaded_steps(run_id) == [8, 12]  # the half upload is there...
    assert checkpoints.recorded_step(run_id) == 8  # ...but not recorded
    got = checkpoints.download_checkpoint(run_id, tmp_path / "elsewhere")
    assert got.name == "step-8" and _files(got) == _files(old)

    checkpoints.upload_checkpoint(run_id, _checkpoint(tmp_path, 16))  # the next upload cleans up
    assert checkpoints.uploaded_steps(run_id) == [16]


def test_a_directory_without_trainer_state_is_refused(run_id, tmp_path):
    partial = tmp_path / "step-3"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoints.upload_checkpoint(run_id, partial)
    assert checkpoints.uploaded_steps(run_id) == []


def test_upload_setting(monkeypatch, tmp_path):
    def enabled(**kwargs) -> bool:
        return checkpoint_sync.upload_enabled(RLHFSettings(home=tmp_path, **kwargs))

    monkeypatch.delenv("RLHF_CHECKPOINT_UPLOAD", raising=False)
    monkeypatch.delenv("RLHF_TRACKING_URI", raising=False)
    assert not enabled()  # the home's own SQLite store: the home is the shared place
    assert enabled(tracking_uri="http://mlflow.internal:5000")
    assert enabled(tracking_uri="https://mlflow.example.com")
    assert not enabled(tracking_uri="http://mlflow.internal:5000", checkpoint_upload="never")
    monkeypatch.setenv("RLHF_CHECKPOINT_UPLOAD", "always")
    assert enabled()
    monkeypatch.setenv("RLHF_CHECKPOINT_UPLOAD", "sometimes")
    with pytest.raises(ValueError, match="checkpoint_upload"):
        RLHFSettings(home=tmp_path)


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_uploader_uploads_only_the_newest_checkpoint(run_id, tmp_path, monkeypatch):
    """Two checkpoints appear between two looks: only the newer is uploaded; a pruned one is skipped."""
    uploads = []
    real_upload = checkpoints.upload_checkpoint
    monkeypatch.setattr(
        checkpoints, "upload_checkpoint", lambda r, c: uploads.append(c.name) or real_upload(r, c)
    )
    directory = tmp_path / "checkpoints"
    uploader = checkpoint_sync.CheckpointUploader(run_id, directory, "sft", poll_seconds=0.05)
    uploader.start()
    try:
        _checkpoint(directory, 2)
        _checkpoint(directory, 4)  # written at once: step-2 is superseded before its turn (or not)
        _wait_for(lambda: uploader.uploaded == 4)
        shutil.rmtree(directory / "step-2")  # the trainer keeps the newest two
        _checkpoint(directory, 6)
        _wait_for(lambda: uploader.uploaded == 6)
    finally:
        uploader.stop()
    assert uploads[-2:] == ["step-4", "step-6"] and uploads.count("step-6") == 1
    assert checkpoints.uploaded_steps(run_id) == [6]
    assert not any(p.name.startswith(".upload-") for p in directory.iterdir())  # snapshots removed


def test_uploader_never_reuploads_the_recorded_checkpoint(run_id, tmp_path, monkeypatch):
    """A resumed stage has the downloaded checkpoint in its dir; it is not uploaded over its record."""
    checkpoints.upload_checkpoint(run_id, _checkpoint(tmp_path / "other-machine", 10))
    directory = tmp_path / "checkpoints"
    checkpoint_sync.fetch_checkpoint(run_id, directory, "sft")
    monkeypatch.setattr(checkpoints, "upload_checkpoint", lambda r, c: pytest.fail(f"uploaded {c.name}"))
    uploader = checkpoint_sync.CheckpointUploader(run_id, directory, "sft")
    assert uploader.sync_once() is None


def test_upload_errors_are_logged_and_never_raised(run_id, tmp_path, monkeypatch, caplog):
    def fail(run_id, checkpoint):
        raise ConnectionError("server gone")

    monkeypatch.setattr(checkpoints, "upload_checkpoint", fail)
    directory = tmp_path / "checkpoints"
    _checkpoint(directory, 2)
    settings = RLHFSettings(home=tmp_path, checkpoint_upload="always")
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        with checkpoint_sync.uploading(settings, run_id, directory, "sft"):
            pass  # stops at once; no flush after success
        failing = checkpoint_sync.uploading(settings, run_id, directory, "sft")
        with pytest.raises(RuntimeError, match="training broke"), failing:
            raise RuntimeError("training broke")  # the flush tries to upload and fails quietly
    assert "could not upload a checkpoint (server gone)" in caplog.text
    assert checkpoints.recorded_step(run_id) is None


def test_a_failed_stage_flushes_its_newest_checkpoint(run_id, tmp_path):
    directory = tmp_path / "checkpoints"
    settings = RLHFSettings(home=tmp_path, checkpoint_upload="always")
    with pytest.raises(RuntimeError), checkpoint_sync.uploading(settings, run_id, directory, "sft"):
        _checkpoint(directory, 6)
        raise RuntimeError("out of memory")
    assert checkpoints.recorded_step(run_id) == 6


def test_fetch_downloads_only_a_newer_checkpoint(run_id, tmp_path):
    checkpoints.upload_checkpoint(run_id, _checkpoint(tmp_path / "remote", 8))
    here = tmp_path / "here"
    _checkpoint(here, 8)
    assert checkpoint_sync.fetch_checkpoint(run_id, here, "sft") is None  # same step: local one used
    shutil.rmtree(here / "step-8")
    _checkpoint(here, 4)
    assert checkpoint_sync.fetch_checkpoint(run_id, here, "sft") == here / "step-8"
    assert sorted(p.name for p in here.iterdir()) == ["step-4", "step-8"]


def test_fetch_of_a_vanished_upload_starts_over(run_id, tmp_path, caplog):
    """The record names a checkpoint whose files are gone: logged, nothing downloaded, no half dir."""
    checkpoints.upload_checkpoint(run_id, _checkpoint(tmp_path / "remote", 8))
    checkpoints._repository(run_id).delete_artifacts("checkpoints/step-8")
    here = tmp_path / "here"
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        assert checkpoint_sync.fetch_checkpoint(run_id, here, "sft") is None
    assert "could not download the checkpoint" in caplog.text
    assert list(here.iterdir()) == []


def test_a_stage_retried_on_another_machine_resumes_from_the_uploaded_checkpoint(
    store, tmp_path, monkeypatch
):
    """Through ``execute_stage``: machine A writes a checkpoint, it is uploaded, A dies; machine B (another
    home, same store) reopens A's run with A's checkpoint in its own work dir; once B succeeds, the
    uploads are deleted."""
    from registry import tracking
    from rlhf_core.refs import DatasetRef
    from rlhf_core.spec import SFTTrainSpec
    from runtime.stage_contract import RunContext, StageCall
    from runtime.stage_execution import execute_stage

    monkeypatch.setenv("RLHF_CHECKPOINT_UPLOAD", "always")
    monkeypatch.setattr(checkpoint_sync, "POLL_SECONDS", 0.05)
    shared, experiment = store  # the store both machines reach; each has its own home (work dirs)
    tracking.configure(shared)
    uri = shared.resolved_tracking_uri()
    parent = tracking.start_pipeline_run(experiment, "machines", {})
    call = StageCall(name="sft", kind="sft", stage=SFTTrainSpec(), seed=0, fingerprint="c" * 64)

    def machine(name: str) -> RunContext:
        home = str(tmp_path / name)
        return RunContext(
            pipeline="machines", experiment_id=experiment, parent_run_id=parent, home=home, tracking_uri=uri
        )

    seen = {}

    def dies_after_an_upload(call, run):
        seen["a"] = run.run_id
        _checkpoint(run.work_dir / "checkpoints", 2, b"trained on A")
        _wait_for(lambda: checkpoints.recorded_step(run.run_id) == 2)
        raise ConnectionError("worker lost")

    with pytest.raises(ConnectionError):
        execute_stage(machine("a"), call, dies_after_an_upload)

    def resumes(call, run):
        assert run.resumed and run.run_id == seen["a"]
        assert (run.work_dir / "checkpoints" / "step-2" / "model.safetensors").read_bytes() == b"trained on A"
        _checkpoint(run.work_dir / "checkpoints", 4)
        _wait_for(lambda: checkpoints.recorded_step(run.run_id) == 4)
        ref = DatasetRef(
            uri="/x", digest="d", kind="sft", splits={"train": 1}, columns=("messages",), stage="sft"
        )
        return {"out": ref}

    outcome = execute_stage(machine("b"), call, resumes)
    assert outcome.status == "resumed" and outcome.run_id == seen["a"]
    assert checkpoints.uploaded_steps(outcome.run_id) == []  # finished: nothing left to resume
    assert checkpoints.recorded_step(outcome.run_id) is None
    assert not (tmp_path / "b" / "work" / "sft-cccccccccccccccc" / "checkpoints").exists()
