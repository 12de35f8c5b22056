"""Shared tracking end to end: ``rlhf run`` against a real ``mlflow server`` with proxied artifacts.

The command runs in a subprocess with ``RLHF_TRACKING_URI=http://127.0.0.1:PORT``, as a second
machine would. What a user would check: each stage ran, the SFT model is registered in the server's
registry, every artifact landed in the server's artifact store (none under the home), every output
ref is an MLflow URI, and a second run is served from the cache.

- SQLite backend store: a plain run (its cached re-run is checked in tests/test_dispatch_e2e.py).
- PostgreSQL backend store: the server is stopped while SFT runs and started again at once (down for
  its graceful stop and its start, ~15 s on 2 cores); the stage's tracking calls wait through the
  outage (HTTP retries) and it finishes: one FINISHED run, exactly one registered version. Then the
  cached re-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow_servers import MlflowServer, mlflow_server, postgres_database

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[1]
MLFLOW_URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")


def _spec(tmp_path: Path, tiny_spec_dict: dict, name: str, sft_steps: int) -> Path:
    tiny_spec_dict["name"] = name
    stages = tiny_spec_dict["stages"]
    del stages["rm"], stages["eval"]
    stages["data"]["source"]["synthetic"]["n"] = 60
    stages["sft"]["train"].update(max_steps=sft_steps, checkpoint_every=sft_steps, log_every=2)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict))
    return path


def _command(spec: Path, home: Path) -> list[str]:
    return [str(Path(sys.executable).with_name("rlhf")), "run", str(spec), "--home", str(home)]


def _env(server: MlflowServer, prefect_api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_HTTP_"))}
    return {
        **env,
        "RLHF_TRACKING_URI": server.url,
        "PREFECT_API_URL": prefect_api_url,
        "OMP_NUM_THREADS": "1",  # tiny models: intra-op threads only fight the other processes
        "MKL_NUM_THREADS": "1",
        "COLUMNS": "200",
    }


def _run(spec: Path, home: Path, server: MlflowServer, prefect_api_url: str) -> None:
    result = subprocess.run(
        _command(spec, home), env=_env(server, prefect_api_url), cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _client(server: MlflowServer):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def _pipeline_runs(server: MlflowServer, name: str) -> list:
    """Pipeline (parent) runs of experiment ``name``, oldest first."""
    c = _client(server)
    experiment = c.get_experiment_by_name(name)
    return c.search_runs(
        [experiment.experiment_id],
        "tags.`rlhf.run_type` = 'pipeline'",
        order_by=["attributes.start_time ASC"],
    )


def _stage_runs(server: MlflowServer, name: str, stage: str) -> list:
    c = _client(server)
    experiment = c.get_experiment_by_name(name)
    return c.search_runs([experiment.experiment_id], f"tags.`rlhf.stage` = '{stage}'")


def _check_shared_store(server: MlflowServer, name: str, home: Path) -> None:
    """Registered in the server's registry, artifacts in its store only, refs that are MLflow URIs."""
    c = _client(server)
    experiment = c.get_experiment_by_name(name)
    assert experiment.artifact_location.startswith("mlflow-artifacts:/"), experiment.artifact_location
    (pipeline,) = _pipeline_runs(server, name)
    assert pipeline.info.status == "FINISHED"
    assert [pipeline.data.tags[f"stage.{s}"].split()[0] for s in ("base", "data", "sft")] == ["ran"] * 3

    versions = c.search_model_versions(f"name = '{name}-sft'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(c.get_model_version_by_alias(f"{name}-sft", "candidate").version) == "1"
    assert versions[0].tags["rlhf.upstream_models"] == f"{name}-base:1"

    for stage in ("base", "data", "sft"):
        (run,) = _stage_runs(server, name, stage)
        assert run.info.status == "FINISHED" and run.data.tags["rlhf.complete"] == "true"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        for ref in json.loads(run.data.tags["rlhf.output_ref"]).values():
            assert ref["uri"].startswith(MLFLOW_URI_PREFIXES), f"{stage}: {ref['uri']} is not an MLflow URI"

    (sft,) = _stage_runs(server, name, "sft")
    (data_input,) = [d for d in sft.inputs.dataset_inputs if d.dataset.name == "data.sft"]
    assert data_input.dataset.source_type == "mlflow_artifacts"  # recorded by URI, not as a local file
    assert json.loads(data_input.dataset.source)["uri"].startswith("mlflow-artifacts:/")

    stored = {p.name for p in server.artifacts_dir.rglob("*") if p.is_file()}
    assert {"train.jsonl", "model.safetensors", "MLmodel"} <= stored
    assert not (home / "mlartifacts").exists() and not (home / "mlflow.db").exists()


def _check_cached_rerun(server: MlflowServer, name: str) -> None:
    first, second = _pipeline_runs(server, name)
    assert second.info.status == "FINISHED"
    assert [second.data.tags[f"stage.{s}"].split()[0] for s in ("base", "data", "sft")] == ["cached"] * 3
    assert len(_stage_runs(server, name, "sft")) == 1
    assert len(_client(server).search_model_versions(f"name = '{name}-sft'")) == 1


def test_pipeline_on_a_sqlite_backed_server_registers_there(tmp_path, tiny_spec_dict, prefect_api_url):
    spec = _spec(tmp_path, tiny_spec_dict, "shared", sft_steps=6)
    home = tmp_path / "home"
    with mlflow_server(tmp_path, f"sqlite:///{tmp_path / 'server.db'}") as server:
        _run(spec, home, server, prefect_api_url)
        _check_shared_store(server, "shared", home)
    # A re-run served from the server's cache: checked on the PostgreSQL-backed server below, and on a
    # SQLite-backed one in tests/test_dispatch_e2e.py.


def _wait_for_stage_run(server: MlflowServer, name: str, stage: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"rlhf run exited ({proc.returncode}) before the {stage} stage started")
        c = _client(server)
        if c.get_experiment_by_name(name) is not None and _stage_runs(server, name, stage):
            return
        time.sleep(0.2)
    pytest.fail(f"no {stage} stage run appeared in time")


def test_postgres_backed_server_restarted_mid_stage_leaves_one_finished_run_and_one_version(
    tmp_path, tiny_spec_dict, prefect_api_url
):
    spec = _spec(tmp_path, tiny_spec_dict, "restarted", sft_steps=30)
    home = tmp_path / "home"
    with postgres_database(tmp_path) as database, mlflow_server(tmp_path, database) as server:
        with open(tmp_path / "run.log", "wb") as log_file:
            proc = subprocess.Popen(
                _command(spec, home), env=_env(server, prefect_api_url), cwd=REPO_ROOT,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            _wait_for_stage_run(server, "restarted", "sft", proc)
            server.stop()
            stopped_ms = time.time() * 1000
            server.start()  # no pause: stopping and starting take long enough to be an outage
            returncode = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log = (tmp_path / "run.log").read_text(errors="replace")
        assert returncode == 0, log[-4000:]
        _check_shared_store(server, "restarted", home)
        (sft,) = _stage_runs(server, "restarted", "sft")
        assert sft.info.end_time > stopped_ms, "the SFT stage ended before the server went down"
        _run(spec, home, server, prefect_api_url)
        _check_cached_rerun(server, "restarted")
