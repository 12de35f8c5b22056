"""Integration: a pipeline deployed on a real Prefect server, its training stages run by a `gpu` pool's
worker, tracked on a real MLflow server; everything on 127.0.0.1 and stopped by PID at the end.

What a platform engineer would check: ``rlhf pools create`` and ``rlhf deploy`` make the pools and
deployments; a run of the pipeline deployment (as the Prefect UI's "Run" starts it) completes on the
`cpu` pool's worker; its training stages ran as ``rlhf-stage/gpu`` flow runs in the `gpu` worker's
processes, not in the pipeline's; MLflow holds the stage runs, the registered models and their
lineage; and a second identical run submits no job at all (every stage from cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow_servers import mlflow_server
from prefect_servers import prefect_worker

from tests import hold_after_first_checkpoint

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[1]
RLHF = str(Path(sys.executable).with_name("rlhf"))
PIPELINE = "dispatch"
PROFILES = {
    "cluster": {
        "pipeline_pool": "cpu",
        "kinds": {"sft": {"pool": "gpu", "env": {"RLHF_LOG_LEVEL": "INFO"}}, "reward_model": {"pool": "gpu"}},
    }
}
HOLD_ARM = "hold-after-next-checkpoint"  # see tests/hold_after_first_checkpoint.py, ARM_VARIABLE


def _spec(tiny: dict) -> dict:
    spec = {**tiny, "name": PIPELINE}
    spec["stages"] = {name: tiny["stages"][name] for name in ("data", "sft", "rm")}
    spec["stages"]["sft"]["train"].update(max_steps=4, checkpoint_every=2, log_every=2)
    spec["stages"]["rm"]["train"].update(max_steps=2)
    return spec


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, real_prefect_server):
    """The session's Prefect server (conftest: a killed job's expired lease is freed within a second) +
    an MLflow server (SQLite) + a `cpu` and a `gpu` process pool with one worker each."""
    root = tmp_path_factory.mktemp("cluster")
    prefect = real_prefect_server.ensure_running()
    # every process of the cluster can be held after a checkpoint, once the test arms the hold
    hooks = hold_after_first_checkpoint.write_sitecustomize(root / "hooks")
    with mlflow_server(root, f"sqlite:///{root / 'mlflow.db'}") as mlflow:
        env = {
            **{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
            **prefect.env(),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "RLHF_DISPATCH_POLL_SECONDS": "1",
            "RLHF_TRACKING_URI": mlflow.url,
            "RLHF_HOME": str(root / "home"),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            hold_after_first_checkpoint.ARM_VARIABLE: str(root / HOLD_ARM),
            "RLHF_LOCK_LEASE_SECONDS": "60",  # a killed holder frees its fingerprint within ~75 s
        }
        for pool, extra in (("cpu", []), ("gpu", ["--concurrency", "1"])):
            _run([RLHF, "pools", "create", pool, "--type", "process", *extra], env)
        with (
            prefect_worker(prefect, "cpu", env=env, cwd=root) as cpu_worker,
            prefect_worker(prefect, "gpu", env=env, limit=1, cwd=root) as gpu_worker,
        ):
            yield {
                "root": root,
                "env": env,
                "mlflow": mlflow,
                "prefect": prefect,
                "workers": (cpu_worker, gpu_worker),
            }


def _run(command: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


QUERY = """
import json, sys
from prefect import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[sys.argv[1]])))
    print(json.dumps([{"id": str(r.id), "name": r.name, "state": r.state_type.value,
                       "deployment_id": str(r.deployment_id), "parent_task_run_id": str(r.parent_task_run_id)}
                      for r in runs]))
"""

RUN_DEPLOYMENT = """
import json, sys
from prefect.deployments import run_deployment
run = run_deployment(sys.argv[1], timeout=900, poll_interval=1)
print(json.dumps({"id": str(run.id), "state": run.state.type.value, "message": run.state.message}))
"""


def _python(code: str, env: dict, *args: str):
    result = _run([sys.executable, "-c", code, *args], env, timeout=960)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def deployed(cluster, tiny_spec_module):
    spec_path = cluster["root"] / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(tiny_spec_module)))
    (cluster["root"] / "profiles.yaml").write_text(yaml.safe_dump({"profiles": PROFILES}))
    result = _run([RLHF, "deploy", str(spec_path), "--profile", "cluster"], cluster["env"])
    return spec_path, result.stdout


@pytest.fixture(scope="module")
def tiny_spec_module():
    import copy

    from conftest import TINY_SPEC

    return copy.deepcopy(TINY_SPEC)


@pytest.fixture(scope="module")
def first_run(cluster, deployed):
    return _python(RUN_DEPLOYMENT, cluster["env"], f"rlhf-pipeline/{PIPELINE}")


def test_deploy_creates_pipeline_and_stage_runner_deployments(deployed):
    _, output = deployed
    assert f"rlhf-pipeline/{PIPELINE}" in output and "rlhf-stage/gpu" in output


def test_pipeline_run_completes_with_training_on_the_gpu_pool(cluster, first_run):
    assert first_run["state"] == "COMPLETED", first_run
    stage_runs = _python(QUERY, cluster["env"], "rlhf-stage")
    assert sorted(r["name"].split("-")[1] for r in stage_runs) == ["rm", "sft"]
    assert all(r["state"] == "COMPLETED" for r in stage_runs), stage_runs

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cluster["mlflow"].url, registry_uri=cluster["mlflow"].url)
    experiment = client.get_experiment_by_name(PIPELINE)
    runs = {r.data.tags.get("mlflow.runName"): r for r in client.search_runs([experiment.experiment_id])}
    sft, rm, data = runs["sft"], runs["rm"], runs["data"]
    stage_flow_runs = {r["id"] for r in stage_runs}
    # training ran in a flow run of the gpu pool's stage runner, in another process than the pipeline's
    assert sft.data.tags["prefect.deployment"] == "rlhf-stage/gpu"
    assert sft.data.tags["prefect.stage_flow_run_id"] in stage_flow_runs
    assert rm.data.tags["prefect.stage_flow_run_id"] in stage_flow_runs
    assert data.data.tags["prefect.stage_flow_run_id"] == first_run["id"]  # in the pipeline's own flow
    assert sft.data.tags["rlhf.pid"] != data.data.tags["rlhf.pid"]
    gpu_worker = cluster["workers"][1]
    assert sft.data.tags["prefect.stage_flow_run_id"] in gpu_worker.log_text()
    # one parent run; lineage of the registered models
    assert (
        sft.data.tags["mlflow.parentRunId"]
        == rm.data.tags["mlflow.parentRunId"]
        == data.data.tags["mlflow.parentRunId"]
    )
    sft_version = client.get_model_version(f"{PIPELINE}-sft", "1")
    rm_version = client.get_model_version(f"{PIPELINE}-rm", "1")
    assert sft_version.run_id == sft.info.run_id and rm_version.run_id == rm.info.run_id
    assert rm.data.tags["input.model"].startswith(f"{PIPELINE}-sft")
    # workers run outside git: stage runs and cards carry the commit rlhf deploy gave the deployments
    from registry.tracking import git_commit

    commit = git_commit(cwd=REPO_ROOT)
    assert commit != "unknown"
    assert sft.data.tags["rlhf.git_commit"] == data.data.tags["rlhf.git_commit"] == commit
    assert sft_version.tags["rlhf.git_commit"] == commit and f"`{commit}`" in sft_version.description
    # artifacts went through the server, not into a local mlartifacts folder of a home
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    assert not (cluster["root"] / "home" / "mlartifacts").exists()


def test_second_identical_run_is_served_from_cache(cluster, first_run):
    before = _python(QUERY, cluster["env"], "rlhf-stage")
    second = _python(RUN_DEPLOYMENT, cluster["env"], f"rlhf-pipeline/{PIPELINE}")
    assert second["state"] == "COMPLETED", second
    after = _python(QUERY, cluster["env"], "rlhf-stage")
    assert len(after) == len(before)  # no job submitted: dispatch found every fingerprint in MLflow

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cluster["mlflow"].url, registry_uri=cluster["mlflow"].url)
    experiment = client.get_experiment_by_name(PIPELINE)
    parents = client.search_runs(
        [experiment.experiment_id],
        "tags.`rlhf.run_type` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
    )
    assert parents[0].data.tags["prefect.flow_run_id"] == second["id"]
    statuses = {k: v.split()[0] for k, v in parents[0].data.tags.items() if k.startswith("stage.")}
    assert statuses == {
        "stage.base": "cached",
        "stage.data": "cached",
        "stage.sft": "cached",
        "stage.rm": "cached",
    }


def _fault_spec(tiny: dict) -> dict:
    spec = {**tiny, "name": f"{PIPELINE}-fault"}
    spec["stages"] = {name: tiny["stages"][name] for name in ("data", "sft")}
    spec["stages"]["sft"]["train"].update(max_steps=6, checkpoint_every=2, log_every=2)
    return spec


def _final_weights(home: Path, fingerprint: str) -> dict:
    from safetensors.torch import load_file

    (model_dir,) = (home / "work").glob(f"sft-{fingerprint[:16]}/model")
    return load_file(model_dir / "model.safetensors")


def test_killed_worker_stage_is_resubmitted_and_resumes_to_the_same_weights(
    cluster, deployed, tiny_spec_module
):
    """SIGKILL the gpu worker and the flow run it started, mid-SFT (held after its first checkpoint: steps
    3-6 are left): the pipeline sees the job is dead (nobody holds its fingerprint's lock any more),
    marks it Crashed, submits it again; a new worker resumes from the last checkpoint (the workers share
    the home), and the weights match an uninterrupted run within 1e-5.

    The lock's lease (60 s, the server's minimum) has to run out before the job looks dead; the
    uninterrupted reference trains meanwhile."""
    import signal
    import time

    from mlflow import MlflowClient

    root, env = cluster["root"], cluster["env"]
    spec_path = root / "fault.yaml"
    spec_path.write_text(yaml.safe_dump(_fault_spec(tiny_spec_module)))
    # dead 10 s after the lease ran out: a finished job's lock is free a moment before it is Completed
    fast = {**env, "RLHF_DISPATCH_DEAD_AFTER_SECONDS": "10"}
    command = [RLHF, "run", str(spec_path), "--profile", "cluster", "--home", env["RLHF_HOME"]]
    log_path = root / "fault-run.log"
    (root / HOLD_ARM).touch()  # the first attempt's training waits after its first checkpoint
    with open(log_path, "w") as log:
        parent = subprocess.Popen(command, env=fast, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = MlflowClient(tracking_uri=cluster["mlflow"].url, registry_uri=cluster["mlflow"].url)
        deadline = time.monotonic() + 600
        while not list(Path(env["RLHF_HOME"]).glob("work/sft-*/checkpoints/step-*/trainer_state.json")):
            assert parent.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no SFT checkpoint in time"
            time.sleep(0.2)
        assert not (root / HOLD_ARM).exists()  # taken by the training that is now held
        experiment = client.get_experiment_by_name(f"{PIPELINE}-fault")
        (sft,) = client.search_runs([experiment.experiment_id], "tags.`mlflow.runName` = 'sft'")
        os.killpg(os.getpgid(int(sft.data.tags["rlhf.pid"])), signal.SIGKILL)  # the flow run's process
        cluster["workers"][1].kill()  # and its worker
        reference_home = root / "reference"
        local_env = {k: v for k, v in env.items() if k not in ("RLHF_TRACKING_URI", "RLHF_HOME")}
        with prefect_worker(cluster["prefect"], "gpu", env=env, limit=1, cwd=root):
            # the uninterrupted reference, while the lease runs out: in-process, on a store of its own
            _run([RLHF, "run", str(spec_path), "--home", str(reference_home)], local_env)
            assert parent.wait(timeout=900) == 0, log_path.read_text()[-4000:]
    finally:
        if parent.poll() is None:
            parent.kill()
    output = log_path.read_text()
    assert "crashed" in output and "submitting it again" in output, output[-4000:]
    assert "resumed" in output
    fingerprint = sft.data.tags["rlhf.fingerprint"]
    jobs = [r for r in _python(QUERY, env, "rlhf-stage") if r["name"].startswith(f"{PIPELINE}-fault-sft-")]
    assert sorted(r["state"] for r in jobs) == ["COMPLETED", "CRASHED"], jobs
    names = {r["state"]: r["name"] for r in jobs}  # the resubmission is visible in the Prefect UI
    assert names["COMPLETED"].endswith(" (attempt 2)") and "attempt" not in names["CRASHED"], jobs
    a, b = _final_weights(reference_home, fingerprint), _final_weights(Path(env["RLHF_HOME"]), fingerprint)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-5, f"max abs weight difference {worst}"


def test_prefect_yaml_deploys_with_the_prefect_cli(cluster, first_run):
    """The repository's prefect.yaml is valid for `prefect deploy` against the same server (run last:
    it replaces the gpu stage runner with its own, equivalent one)."""
    result = _run(
        [str(Path(sys.executable).with_name("prefect")), "--no-prompt", "deploy", "--all"], cluster["env"]
    )
    assert "rlhf-stage/gpu" in result.stdout and "rlhf-pipeline/quickstart" in result.stdout, result.stdout
