"""Job templates and job variables of the work pools that run dispatched stages (``flows.work_pools``).

Offline: every template is rendered the way a worker renders it (the variables' defaults, then the
job's values, put into ``job_configuration`` by Prefect's ``apply_values``) and checked against its own
``variables`` schema by Prefect's ``validate``. One test creates pools on the session's temporary
Prefect server. Where ``prefect-docker`` / ``prefect-kubernetes`` are installed, the rendered
templates are also handed to those workers' own configuration classes (skipped otherwise).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from unittest.mock import MagicMock

import pytest
from prefect.utilities.schema_tools import validate
from prefect.utilities.templating import apply_values, find_placeholders
from typer.testing import CliRunner

from cli.pool_commands import pools_app
from flows.work_pools import (
    DEFAULT_IMAGE,
    POOL_TYPES,
    base_job_template,
    bundled_template,
    ensure_work_pool,
    job_variables_for,
    memory_quantity,
)
from rlhf_core.errors import EXIT_USER_ERROR, UserError
from rlhf_core.spec.compute import ComputeSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_REQUEST = {"Driver": "nvidia", "Count": 2, "Capabilities": [["gpu"]]}
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def render(template: dict, values: dict) -> dict:
    """The job configuration a worker builds: variable defaults, then ``values``, into the template."""
    properties = template["variables"]["properties"]
    defaults = {name: prop["default"] for name, prop in properties.items() if "default" in prop}
    return apply_values(template["job_configuration"], {**defaults, **values})


def variables_for(pool_type: str, **compute) -> dict:
    return job_variables_for(ComputeSpec(**compute), pool_type, base_job_template(pool_type), "sft")


@pytest.mark.parametrize("pool_type", POOL_TYPES)
def test_every_placeholder_of_a_template_is_one_of_its_variables(pool_type):
    template = base_job_template(pool_type)
    names = {p.name for p in find_placeholders(template["job_configuration"])}
    assert names <= set(template["variables"]["properties"]), names - set(template["variables"]["properties"])


def test_docker_and_kubernetes_templates_start_from_the_ones_prefect_ships():
    for pool_type, added in (
        ("docker", {"device_requests", "shm_size"}),
        ("kubernetes", {"gpus", "node_selector", "tolerations", "shm_size"}),
    ):
        shipped = bundled_template(pool_type)
        ours = base_job_template(pool_type)
        assert set(ours["variables"]["properties"]) == set(shipped["variables"]["properties"]) | added
        assert ours["variables"]["properties"]["image"]["default"] == DEFAULT_IMAGE
    assert "container_create_kwargs" not in bundled_template("docker")["job_configuration"]  # why we add it


def test_docker_gpus_become_device_requests_and_memory_a_mem_limit():
    values = variables_for("docker", pool="gpu", gpus=2, memory="32Gi", env={"HF_HOME": "/data/hf"})
    assert values == {"env": {"HF_HOME": "/data/hf"}, "mem_limit": "32g", "device_requests": [GPU_REQUEST]}
    job = render(base_job_template("docker"), values)
    assert job["container_create_kwargs"] == {"device_requests": [GPU_REQUEST], "shm_size": "1g"}
    assert (job["mem_limit"], job["image"], job["env"]) == ("32g", DEFAULT_IMAGE, {"HF_HOME": "/data/hf"})


def test_docker_job_without_gpus_asks_docker_for_no_device():
    """No request at all, not one with Count 0: docker would still demand the NVIDIA runtime."""
    assert variables_for("docker", pool="cpu", gpus=0) == {}
    assert render(base_job_template("docker"), {})["container_create_kwargs"] == {"shm_size": "1g"}


def test_a_docker_pool_pinned_to_gpus_hands_its_jobs_those_gpus():
    """Docker gives a count-based request GPUs 0..N-1, whichever job holds them: a pool per GPU
    (--gpu-ids) keeps two one-GPU jobs on one host apart."""
    template = base_job_template("docker", gpu_ids=["2", "3"])
    pinned = {"Driver": "nvidia", "DeviceIDs": ["2", "3"], "Capabilities": [["gpu"]]}
    assert render(template, {})["container_create_kwargs"]["device_requests"] == [pinned]
    values = job_variables_for(ComputeSpec(pool="gpu23", gpus=1), "docker", template, "sft")
    assert values == {
        "device_requests": [{"Driver": "nvidia", "DeviceIDs": ["2"], "Capabilities": [["gpu"]]}]
    }
    assert job_variables_for(ComputeSpec(pool="gpu23", gpus=0), "docker", template, "data") == {
        "device_requests": []
    }
    with pytest.raises(
        UserError,
        match="stage 'sft', compute.gpus: 3 GPUs asked for, but the docker pool 'gpu23' has GPUs 2, 3 only",
    ):
        job_variables_for(ComputeSpec(pool="gpu23", gpus=3), "docker", template, "sft")
    with pytest.raises(
        UserError,
        match="only docker pools pin GPUs; a process pool takes them from its worker's CUDA_VISIBLE_DEVICES",
    ):
        base_job_template("process", gpu_ids=["0"])


def test_kubernetes_gpus_memory_node_selector_and_tolerations_land_in_the_job_manifest():
    template = base_job_template("kubernetes")
    values = variables_for(
        "kubernetes",
        pool="k8s-gpu",
        gpus=1,
        memory="32Gi",
        image="registry.example/rlhf-pipelines:gpu",
        job_variables={"node_selector": {"nvidia.com/gpu.product": "A100"}, "tolerations": [TOLERATION]},
    )
    assert validate(values, template["variables"], preprocess=True, ignore_required=True) == []
    pod = render(template, values)["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"] == {
        "limits": {"memory": "32Gi", "nvidia.com/gpu": 1},
        "requests": {"memory": "32Gi"},
    }
    assert container["image"] == "registry.example/rlhf-pipelines:gpu"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "A100"}
    assert pod["tolerations"] == [TOLERATION]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}]
    assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    plain = render(template, {})["job_manifest"]["spec"]["template"]["spec"]
    assert "nodeSelector" not in plain and "tolerations" not in plain
    assert "nvidia.com/gpu" not in plain["containers"][0]["resources"]["limits"]


@pytest.mark.parametrize(
    ("pool_type", "job_variables", "expected"),
    [
        (
            "kubernetes",
            {"gpus": -1},
            "stage 'sft', compute.job_variables.gpus (the kubernetes pool 'p'): -1 is less",
        ),
        (
            "docker",
            {"gpus": -1},
            "compute.job_variables.gpus: not a job variable of the template of the docker",
        ),
        ("kubernetes", {"gpu": 1}, "stage 'sft', compute.job_variables.gpu: not a job variable"),
        ("kubernetes", {"tolerations": [{"effect": "Never"}]}, "compute.job_variables.tolerations[0].effect"),
        ("docker", {"device_requests": [{"Count": -2}]}, "compute.job_variables.device_requests[0].Count"),
        (
            "process",
            {"stream_output": "yes"},
            "stage 'sft', compute.job_variables.stream_output (the process",
        ),
    ],
)
def test_invalid_job_variables_are_refused_naming_the_stage_and_field(pool_type, job_variables, expected):
    with pytest.raises(UserError) as caught:
        variables_for(pool_type, pool="p", job_variables=job_variables)
    assert expected in str(caught.value)


def test_a_gpus_job_variable_on_docker_points_to_compute_gpus():
    with pytest.raises(UserError, match="use compute.gpus, which sets device_requests"):
        variables_for("docker", pool="p", job_variables={"gpus": 1})


def test_process_pool_takes_env_and_passes_job_variables_through():
    """compute.env, then compute.job_variables' env over it, then both over the pool's env, as the
    process worker's own configuration class builds the job."""
    from prefect.workers.process import ProcessJobConfiguration

    values = variables_for(
        "process",
        pool="cpu",
        env={"CUDA_VISIBLE_DEVICES": "0", "A": "1"},
        job_variables={"env": {"A": "2"}, "working_dir": "/srv/rlhf"},
    )
    assert values == {"env": {"CUDA_VISIBLE_DEVICES": "0", "A": "2"}, "working_dir": "/srv/rlhf"}
    template = base_job_template("process", env={"RLHF_TRACKING_URI": "http://mlflow:5000", "A": "0"})
    job = asyncio.run(ProcessJobConfiguration.from_template_and_values(template, values, client=MagicMock()))
    assert job.env == {"RLHF_TRACKING_URI": "http://mlflow:5000", "A": "2", "CUDA_VISIBLE_DEVICES": "0"}
    assert str(job.working_dir) == "/srv/rlhf"
    assert variables_for("process", pool="cpu") == {}


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("gpus", 1, "CUDA_VISIBLE_DEVICES=0 prefect worker start --pool cpu --limit 1"),
        ("memory", "8g", "cannot limit a job's memory"),
        ("image", "rlhf-pipelines:gpu", "cannot run a job in an image"),
    ],
)
def test_process_pool_refuses_what_only_containers_can_give(field, value, says):
    with pytest.raises(UserError) as caught:
        variables_for("process", pool="cpu", **{field: value})
    message = str(caught.value)
    assert message.startswith(f"stage 'sft', compute.{field}: the process pool 'cpu' ")
    assert says in message and "docker or kubernetes pool" in message


def test_a_pool_with_prefects_plain_template_is_told_to_take_rlhfs():
    with pytest.raises(
        UserError, match="has no variable 'device_requests'.*rlhf pools create gpu --type docker"
    ):
        job_variables_for(ComputeSpec(pool="gpu", gpus=1), "docker", bundled_template("docker"), "sft")


@pytest.mark.parametrize(
    ("memory", "docker", "kubernetes"),
    [
        ("32Gi", "32g", "32Gi"),
        ("32g", "32g", "32Gi"),  # docker's lower-case units count in 1024s
        ("32G", "32g", "32G"),  # decimal for kubernetes; docker has only binary units
        ("32GB", "32g", "32G"),
        ("512Mi", "512m", "512Mi"),
        ("1.5T", "1536g", "1.5T"),
        ("2K", "2k", "2k"),
        ("1048576", "1048576b", "1048576"),
    ],
)
def test_memory_in_each_pools_notation(memory, docker, kubernetes):
    assert (memory_quantity(memory, "docker"), memory_quantity(memory, "kubernetes")) == (docker, kubernetes)


def test_work_pools_on_a_prefect_server(prefect_api_url):
    """A process pool with a concurrency limit, as `rlhf pools create` makes it, read back from the server."""
    from prefect import get_client
    from prefect.workers.process import ProcessWorker

    name = f"gpu-{uuid.uuid4().hex[:8]}"
    assert ensure_work_pool(name, "process", concurrency_limit=1) == "created"
    assert ensure_work_pool(name, "process", concurrency_limit=3) == "unchanged"
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool(name)
        assert (pool.type, pool.concurrency_limit) == ("process", 1)
        assert pool.base_job_template == ProcessWorker.get_default_base_job_template()
        assert ensure_work_pool(name, "process", concurrency_limit=2, overwrite=True) == "updated"
        assert client.read_work_pool(name).concurrency_limit == 2
    with pytest.raises(UserError, match=f"work pool '{name}' is a process pool, not docker"):
        ensure_work_pool(name, "docker", overwrite=True)

    docker_name = f"docker-{uuid.uuid4().hex[:8]}"
    result = CliRunner().invoke(pools_app, ["create", docker_name, "--type", "docker", "--concurrency", "1"])
    assert result.exit_code == 0, result.output
    assert f"work pool '{docker_name}' (docker, concurrency limit 1) created" in result.output
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool(docker_name)
    assert (pool.type, pool.concurrency_limit) == ("docker", 1)
    values = job_variables_for(
        ComputeSpec(pool=docker_name, gpus=2), pool.type, pool.base_job_template, "sft"
    )
    assert values == {"device_requests": [GPU_REQUEST]}
    result = CliRunner().invoke(pools_app, ["create", docker_name, "--type", "kubernetes"])
    assert result.exit_code == EXIT_USER_ERROR and "is a docker pool, not kubernetes" in result.output


def test_pools_template_prints_json_for_prefect_work_pool_create(tmp_path):
    out = tmp_path / "k8s.json"
    args = [
        "template",
        "kubernetes",
        "--image",
        "r/rlhf:gpu",
        "--env",
        "RLHF_TRACKING_URI=http://mlflow:5000",
    ]
    result = CliRunner().invoke(pools_app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    properties = json.loads(out.read_text())["variables"]["properties"]
    assert properties["image"]["default"] == "r/rlhf:gpu" and "gpus" in properties
    assert properties["env"]["default"] == {"RLHF_TRACKING_URI": "http://mlflow:5000"}
    result = CliRunner().invoke(pools_app, ["template", "process", "--env", "1X=y"])
    assert result.exit_code == EXIT_USER_ERROR and "--env 1X=y: expected KEY=VALUE" in result.output


def test_importing_the_pools_commands_loads_no_prefect():
    probe = (
        "import sys, cli.pool_commands; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow', 'torch'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_docker_worker_accepts_the_rendered_job():
    """prefect-docker's own configuration class and docker-py's HostConfig take the job as rendered."""
    worker_module = pytest.importorskip("prefect_docker.worker")
    import docker.types

    template = base_job_template("docker")
    values = variables_for("docker", pool="gpu", gpus=2, memory="32Gi")
    config_class = worker_module.DockerWorkerJobConfiguration
    config = asyncio.run(config_class.from_template_and_values(template, values, client=MagicMock()))
    worker = worker_module.DockerWorker.__new__(worker_module.DockerWorker)  # only its settings builder
    settings = worker._build_container_settings(MagicMock(), config)
    assert settings["device_requests"] == [GPU_REQUEST] and settings["mem_limit"] == "32g"
    host = docker.types.HostConfig(
        version="1.44", device_requests=settings["device_requests"], mem_limit="32g"
    )
    assert host["DeviceRequests"][0]["Count"] == 2 and host["Memory"] == 32 * 1024**3
    plain = asyncio.run(config_class.from_template_and_values(template, {}, client=MagicMock()))
    assert "device_requests" not in worker._build_container_settings(MagicMock(), plain)


def test_the_kubernetes_worker_accepts_the_rendered_job():
    """prefect-kubernetes' configuration class checks the manifest and prepares it for a flow run."""
    worker_module = pytest.importorskip("prefect_kubernetes.worker")
    from prefect.client.schemas.objects import FlowRun

    template = base_job_template("kubernetes")
    values = variables_for("kubernetes", pool="k", gpus=1, job_variables={"tolerations": [TOLERATION]})
    config_class = worker_module.KubernetesWorkerJobConfiguration
    config = asyncio.run(config_class.from_template_and_values(template, values, client=MagicMock()))
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="run", flow_id=uuid.uuid4()))
    pod = config.job_manifest["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert pod["containers"][0]["args"] == ["prefect", "flow-run", "execute"]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert pod["tolerations"] == [TOLERATION]


def test_a_pool_limit_of_one_hands_its_workers_one_run_at_a_time(prefect_api_url):
    """What `--concurrency 1` does on the server: while one run of the pool is pending or running, a
    polling worker is handed no other, however many are scheduled (a pool without a limit hands out
    both). The job variables job_variables_for makes pass the server's own check of the template."""
    from prefect import get_client
    from prefect.states import Completed, Pending, Running

    with get_client(sync_client=True) as client:
        unlimited, _ = _pool_with_two_scheduled_runs(client, None)
        assert len(_handed_out(client, unlimited)) == 2
        name, runs = _pool_with_two_scheduled_runs(client, 1)
        assert {r.job_variables["mem_limit"] for r in runs} == {"8g"}
        first = _handed_out(client, name)
        assert len(first) == 1
        client.set_flow_run_state(first[0], Pending())
        client.set_flow_run_state(first[0], Running())
        assert _handed_out(client, name) == []
        client.set_flow_run_state(first[0], Completed())
        second = _handed_out(client, name)
        assert len(second) == 1 and second != first


def _pool_with_two_scheduled_runs(client, concurrency_limit: int | None) -> tuple[str, list]:
    name = f"one-gpu-{uuid.uuid4().hex[:8]}"
    ensure_work_pool(name, "docker", concurrency_limit=concurrency_limit)
    pool = client.read_work_pool(name)
    compute = ComputeSpec(pool=name, gpus=1, memory="8g")
    job_variables = job_variables_for(compute, pool.type, pool.base_job_template, "sft")
    flow_id = client.create_flow_from_name("rlhf-pool-limit-test")
    deployment = client.create_deployment(flow_id, name, work_pool_name=name, entrypoint="flows.x:y")
    runs = [client.create_flow_run_from_deployment(deployment, job_variables=job_variables) for _ in range(2)]
    return name, runs


def _handed_out(client, pool_name: str) -> list:
    """The runs a worker polling the pool now would be given."""
    return [r.flow_run.id for r in client.get_scheduled_flow_runs_for_work_pool(pool_name)]
