"""Resume on another machine: checkpoints stored with the stage run on a real ``mlflow server``.

Three homes stand for three machines (nothing shared between them but the tracking server):

- C runs the spec uninterrupted against its own SQLite store: the reference weights.
- A runs it against the server, held after its first checkpoint (``hold_after_first_checkpoint.py``),
  and is SIGKILLed once that checkpoint is stored with its SFT run (tag ``rlhf.checkpoint_step``).
- B runs the same spec against the same server from an empty home (no local checkpoint): it must
  download A's checkpoint, say it resumed A's run, and end with C's weights to within 1e-5. Once it
  finished, no checkpoint is left on the server.

A runs with its own temporary Prefect server: a killed run keeps its fingerprint lock on a shared
Prefect server until the lease runs out (``runtime.fingerprint_lock``), and the session's test server
frees no expired leases; C and B use the session's server.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow_servers import MlflowServer, mlflow_server
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_TAG = "rlhf.checkpoint_step"


def _spec(tmp_path: Path, tiny_spec_dict: dict) -> Path:
    tiny_spec_dict["name"] = "ckptsync"
    stages = tiny_spec_dict["stages"]
    del stages["rm"], stages["eval"]
    stages["data"]["source"]["synthetic"]["n"] = 60
    # A is held after its step-10 checkpoint: B, resuming from it, has most of the training left to do.
    stages["sft"]["train"].update(max_steps=30, checkpoint_every=10, log_every=10, batch_size=16)
    path = tmp_path / "ckptsync.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict))
    return path


def _command(spec: Path, home: Path, *, hold_after_first_checkpoint: bool = False) -> list[str]:
    """``rlhf run``; held after its first checkpoint (``tests/hold_after_first_checkpoint.py``) for the
    run the test kills, so it cannot finish the stage before the kill however loaded the machine is."""
    held = [str(REPO_ROOT / "tests" / "hold_after_first_checkpoint.py")]
    entry = held if hold_after_first_checkpoint else ["-m", "cli.app"]
    return [sys.executable, *entry, "run", str(spec), "--home", str(home)]


def _env(tracking_uri: str | None, prefect_api_url: str | None, home: Path) -> dict[str, str]:
    drop = ("MLFLOW_TRACKING_", "MLFLOW_HTTP_", "RLHF_", "PREFECT_API_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="200")
    if tracking_uri:
        env["RLHF_TRACKING_URI"] = tracking_uri
    if prefect_api_url:
        env["PREFECT_API_URL"] = prefect_api_url
    else:
        env["PREFECT_HOME"] = str(home / "prefect")  # its own temporary server's database
    return env


def _run(spec: Path, home: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        _command(spec, home), env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _sft_runs(server: MlflowServer) -> list:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    experiment = c.get_experiment_by_name("ckptsync")
    if experiment is None:
        return []
    return c.search_runs([experiment.experiment_id], "tags.`rlhf.stage` = 'sft'")


def _wait_for_upload(server: MlflowServer, proc: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in _sft_runs(server):
            if CHECKPOINT_TAG in run.data.tags:
                return int(run.data.tags[CHECKPOINT_TAG])
        if proc.poll() is not None:
            pytest.fail(f"rlhf run exited ({proc.returncode}) before a checkpoint was stored with its run")
        time.sleep(0.1)
    pytest.fail("no checkpoint was stored with the sft run in time")


def _final_weights(home: Path) -> dict:
    (model_dir,) = (home / "work").glob("sft-*/model")
    return load_file(model_dir / "model.safetensors")


def test_killed_stage_resumes_on_another_machine_from_the_checkpoint_stored_with_its_run(
    tmp_path, tiny_spec_dict, prefect_api_url
):
    spec = _spec(tmp_path, tiny_spec_dict)
    home_a, home_b, home_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    t0 = time.monotonic()
    _run(spec, home_c, _env(None, prefect_api_url, home_c))
    took = {"C (reference)": time.monotonic() - t0}

    with mlflow_server(tmp_path, f"sqlite:///{tmp_path / 'server.db'}") as server:
        proc = subprocess.Popen(
            _command(spec, home_a, hold_after_first_checkpoint=True),
            env=_env(server.url, None, home_a),
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        t0 = time.monotonic()
        try:
            stored = _wait_for_upload(server, proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        took["A (until killed)"] = time.monotonic() - t0
        (killed,) = _sft_runs(server)
        assert killed.info.status == "RUNNING", "A was killed before its sft stage finished"
        assert not list((home_a / "work").glob("sft-*/model"))

        t0 = time.monotonic()
        output = _run(spec, home_b, _env(server.url, prefect_api_url, home_b))
        took["B (resumed)"] = time.monotonic() - t0
        downloaded = re.search(r"downloaded checkpoint step-(\d+) of run (\w+)", output)
        assert downloaded, output[-3000:]
        assert int(downloaded.group(1)) >= stored and downloaded.group(2) == killed.info.run_id
        assert f"resuming interrupted run {killed.info.run_id}" in output
        assert "resumed_from_step" in output

        (finished,) = _sft_runs(server)
        assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
        assert CHECKPOINT_TAG not in finished.data.tags
        left = [p for p in server.artifacts_dir.rglob("step-*") if p.is_dir()]
        assert left == [], f"uploaded checkpoints left after the stage finished: {left}"

    print(f"A killed after step-{stored} was stored; B downloaded step-{downloaded.group(1)}; seconds:", took)
    a, b = _final_weights(home_c), _final_weights(home_b)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-5, f"max abs weight difference {worst}"
