"""Work pools and their job templates: where a dispatched stage runs, and what its job asks for.

A stage whose ``compute.pool`` is set runs as a flow run of that Prefect work pool. The pool's *base
job template* says what a job may ask for (its ``variables``, a JSON schema) and how those values
become the worker's job configuration (``job_configuration``, with ``{{ placeholders }}``). Three
pool types are supported:

- ``process``: the job is a process on the worker's machine; Prefect's own template (command, env,
  labels, name, stream_output, working_dir). It cannot give a job GPUs, memory or an image: start one
  worker per GPU with ``CUDA_VISIBLE_DEVICES`` set and ``--limit 1`` instead.
- ``docker``: Prefect's bundled template plus ``device_requests``, wired into
  ``container_create_kwargs.device_requests`` (docker's ``--gpus``); ``compute.gpus: N`` becomes one
  request ``{"Driver": "nvidia", "Count": N, "Capabilities": [["gpu"]]}``; ``compute.memory`` becomes
  ``mem_limit``; ``shm_size`` (default 1g: docker's 64m is too small for NCCL and DataLoader workers)
  goes to ``container_create_kwargs.shm_size``. Docker gives a count-based request GPUs 0..N-1
  whichever other container holds them, so on a multi-GPU host each pool is pinned to its own GPUs
  (``gpu_ids``: the default request names them, and ``compute.gpus: N`` takes the first N). The worker
  needs the ``prefect-docker`` package (0.7 or later reads ``container_create_kwargs``) and the host
  the NVIDIA container toolkit.
- ``kubernetes``: Prefect's bundled template plus ``gpus`` (the container's ``nvidia.com/gpu``
  limit), ``node_selector`` and ``tolerations`` (the pod's ``nodeSelector`` and ``tolerations``);
  ``compute.memory`` becomes both ``memory_request`` and ``memory_limit``; ``shm_size`` (default 1Gi)
  sizes a memory-backed ``/dev/shm``. The worker needs ``prefect-kubernetes``, the cluster the NVIDIA
  device plugin.

Docker and kubernetes templates are read from the worker metadata that Prefect ships with its server
(the one ``prefect work-pool create --type docker`` falls back to offline), never from the network.
Why docker gets ``device_requests`` rather than a ``gpus`` variable: a template has no conditionals,
so a request written into it with ``"Count": "{{ gpus }}"`` would stay in every job, and docker then
insists on the NVIDIA runtime (and exposes every GPU of images that set ``NVIDIA_VISIBLE_DEVICES``)
even when no GPU was asked for; a whole-list variable simply disappears when unset.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rlhf_core.errors import UserError

if TYPE_CHECKING:  # an annotation only: `rlhf pools ...` and `rlhf --help` need not load the spec package
    from rlhf_core.spec.compute import ComputeSpec

POOL_TYPES = ("process", "docker", "kubernetes")
DEFAULT_IMAGE = "rlhf-pipelines:cpu"  # the Dockerfile's image: docker build -t rlhf-pipelines:cpu .
WORKER_METADATA = "server/api/collections_data/views/aggregate-worker-metadata.json"
WORKER_PACKAGES = {"docker": "prefect-docker", "kubernetes": "prefect-kubernetes"}

# Which job variables each ComputeSpec field sets, per pool type (any other pool type: env, image).
FIELD_VARIABLES: dict[str, dict[str, tuple[str, ...]]] = {
    "process": {"env": ("env",)},
    "docker": {"env": ("env",), "image": ("image",), "memory": ("mem_limit",), "gpus": ("device_requests",)},
    "kubernetes": {
        "env": ("env",),
        "image": ("image",),
        "memory": ("memory_request", "memory_limit"),
        "gpus": ("gpus",),
    },
}
OTHER_POOL_VARIABLES: dict[str, tuple[str, ...]] = {"env": ("env",), "image": ("image",)}
MAPPED_FIELDS = ("env", "image", "memory", "gpus")
GPU_SOURCES = {
    "process": "takes them from its worker's CUDA_VISIBLE_DEVICES",
    "kubernetes": "gets them from the cluster's device plugin",
}

DEVICE_REQUEST = {
    "type": "object",
    "properties": {
        "Driver": {"type": "string", "description": "Device driver, e.g. 'nvidia'."},
        "Count": {"type": "integer", "minimum": -1, "description": "Number of devices; -1: all of them."},
        "DeviceIDs": {"type": "array", "items": {"type": "string"}, "description": "Devices by id."},
        "Capabilities": {
            "type": "array",
            "items": {"type": "array", "items": {"type": "string"}},
            "description": "Capability sets, any of which satisfies the request, e.g. [['gpu']].",
        },
        "Options": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
TOLERATION = {
    "type": "object",
    "properties": {
        "key": {"type": "string"},
        "operator": {"type": "string", "enum": ["Exists", "Equal"]},
        "value": {"type": "string"},
        "effect": {"type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
        "tolerationSeconds": {"type": "integer"},
    },
    "additionalProperties": False,
}


def base_job_template(
    pool_type: str,
    image: str | None = DEFAULT_IMAGE,
    env: dict[str, str] | None = None,
    gpu_ids: list[str] | None = None,
) -> dict[str, Any]:
    """The base job template for a new pool of ``pool_type``.

    ``image``: the default job image of docker and kubernetes pools (None keeps Prefect's). ``env``:
    environment every job of the pool gets (e.g. ``RLHF_TRACKING_URI``); a job's own ``env`` is merged
    over it. Container jobs do not inherit their worker's environment, process jobs do. ``gpu_ids``
    (docker only): the host's GPUs this pool's jobs use. Docker hands out GPUs by count from GPU 0, so
    two jobs asking for one GPU each both get GPU 0; a pool per GPU (or GPU group) keeps them apart.
    """
    if gpu_ids and pool_type != "docker":
        source = GPU_SOURCES.get(pool_type, "does not take them from rlhf")
        raise UserError(f"--gpu-ids: only docker pools pin GPUs; a {pool_type} pool {source}")
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker

        template = ProcessWorker.get_default_base_job_template()
    elif pool_type in POOL_TYPES:
        template = bundled_template(pool_type)
        if pool_type == "docker":
            _add_docker_settings(template)
        else:
            _add_kubernetes_settings(template)
        if image:
            template["variables"]["properties"]["image"]["default"] = image
        if gpu_ids:
            template["variables"]["properties"]["device_requests"]["default"] = [gpu_request(ids=gpu_ids)]
    else:
        raise UserError(f"pool type '{pool_type}': not one of {', '.join(POOL_TYPES)}")
    if env:
        template["variables"]["properties"]["env"]["default"] = dict(env)
    return template


def bundled_template(pool_type: str) -> dict[str, Any]:
    """Prefect's default template for ``pool_type`` as shipped in its server package (a deep copy)."""
    import prefect

    metadata = json.loads((Path(prefect.__file__).parent / WORKER_METADATA).read_text())
    worker = metadata[WORKER_PACKAGES[pool_type]][pool_type]
    return copy.deepcopy(worker["default_base_job_configuration"])


def gpu_request(count: int | None = None, ids: list[str] | None = None) -> dict[str, Any]:
    """A docker device request for ``count`` NVIDIA GPUs, or for the GPUs ``ids`` (docker --gpus)."""
    devices = {"Count": count} if ids is None else {"DeviceIDs": list(ids)}
    return {"Driver": "nvidia", **devices, "Capabilities": [["gpu"]]}


def pinned_gpu_ids(base_job_template: dict[str, Any]) -> list[str]:
    """The GPUs a docker pool's template pins by default (``--gpu-ids``); [] when none."""
    device_requests = base_job_template.get("variables", {}).get("properties", {}).get("device_requests", {})
    return [i for request in device_requests.get("default") or [] for i in request.get("DeviceIDs", [])]


def _add_docker_settings(template: dict[str, Any]) -> None:
    properties = template["variables"]["properties"]
    properties.pop("container_create_kwargs", None)  # newer snapshots have it; ours is wired below
    properties["device_requests"] = {
        "title": "GPU device requests",
        "description": "Docker device requests of the container (docker run --gpus), e.g. "
        '[{"Driver": "nvidia", "Count": 1, "Capabilities": [["gpu"]]}]; rlhf fills it from compute.gpus. '
        "The host needs the NVIDIA container toolkit.",
        "type": "array",
        "items": DEVICE_REQUEST,
    }
    properties["shm_size"] = {
        "title": "Shared memory",
        "description": "Size of the container's /dev/shm, e.g. '8g'; docker's own 64m is too small for "
        "NCCL and DataLoader workers.",
        "type": "string",
        "default": "1g",
    }
    template["job_configuration"]["container_create_kwargs"] = {
        "device_requests": "{{ device_requests }}",
        "shm_size": "{{ shm_size }}",
    }


def _add_kubernetes_settings(template: dict[str, Any]) -> None:
    properties = template["variables"]["properties"]
    properties["gpus"] = {
        "title": "GPUs",
        "description": "nvidia.com/gpu limit of the job's container (needs the NVIDIA device plugin).",
        "type": "integer",
        "minimum": 0,
    }
    properties["node_selector"] = {
        "title": "Node selector",
        "description": 'Labels a node must have to run the job, e.g. {"nvidia.com/gpu.present": "true"}.',
        "type": "object",
        "additionalProperties": {"type": "string"},
    }
    properties["tolerations"] = {
        "title": "Tolerations",
        "description": "Taints the job's pod tolerates, e.g. "
        '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}].',
        "type": "array",
        "items": TOLERATION,
    }
    properties["shm_size"] = {
        "title": "Shared memory",
        "description": "Size limit of the memory-backed /dev/shm mounted into the job's container (it "
        "counts towards the memory limit), e.g. '8Gi'; NCCL and DataLoader workers need more than the "
        "runtime's default.",
        "type": "string",
        "default": "1Gi",
    }
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}}]
    container = pod["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpus }}"
    container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]


def job_variables_for(
    compute: ComputeSpec, pool_type: str, base_job_template: dict[str, Any], stage: str
) -> dict[str, Any]:
    """The job variables that run ``stage`` with ``compute`` on a pool of ``pool_type``.

    ``compute.env``, ``image``, ``memory`` and ``gpus`` become the pool's variables (see
    ``FIELD_VARIABLES``); ``compute.job_variables`` are passed as they are and win (their ``env`` is
    merged into ``compute.env``). The result is checked against the template's ``variables`` schema,
    offline; UserError naming the stage and field when the pool cannot honour something.
    """
    properties = base_job_template.get("variables", {}).get("properties", {})
    pool = f"the {pool_type} pool '{compute.pool}'" if compute.pool else f"a {pool_type} pool"
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for field in MAPPED_FIELDS:
        value = getattr(compute, field)
        if value is None or value == {}:
            continue
        if (
            field == "gpus"
            and value == 0
            and not (pool_type == "docker" and pinned_gpu_ids(base_job_template))
        ):
            continue  # no GPUs is what a job gets anyway, except from a pool that pins some
        names = FIELD_VARIABLES.get(pool_type, OTHER_POOL_VARIABLES).get(field)
        if not names:
            raise UserError(
                f"stage '{stage}', compute.{field}: {pool} {_cannot(field, pool_type, compute.pool)}"
            )
        for name in names:
            if name not in properties:
                raise UserError(
                    f"stage '{stage}', compute.{field}: the job template of {pool} has no variable "
                    f"'{name}'; give the pool rlhf's template: rlhf pools create {compute.pool or 'NAME'} "
                    f"--type {pool_type} --overwrite"
                )
            values[name] = _variable_value(field, value, pool_type, base_job_template, stage, pool)
            origins[name] = f"compute.{field}"
    for name, value in compute.job_variables.items():
        origins[name] = f"compute.job_variables.{name}"
        merge_env = name == "env" and isinstance(value, dict) and isinstance(values.get("env"), dict)
        values[name] = {**values["env"], **value} if merge_env else value
    check_job_variables(values, base_job_template, origins, f"stage '{stage}'", pool_type, pool)
    return values


def _instead(name: str, pool_type: str) -> str:
    """A hint for a job variable that is one of ComputeSpec's own fields under another name here."""
    names = FIELD_VARIABLES.get(pool_type, OTHER_POOL_VARIABLES).get(name)
    return f"; use compute.{name}, which sets {', '.join(names)}" if names else ""


def _cannot(field: str, pool_type: str, pool_name: str | None) -> str:
    if pool_type != "process":
        return (
            f"does not take compute.{field} from rlhf; set the pool's job variables in compute.job_variables"
        )
    if field == "gpus":
        return (
            "cannot hand a job GPUs: its jobs are processes on the worker's machine. Start one worker per "
            f"GPU with CUDA_VISIBLE_DEVICES set (CUDA_VISIBLE_DEVICES=0 prefect worker start --pool "
            f"{pool_name or 'POOL'} --limit 1) and leave compute.gpus unset, or use a docker or kubernetes "
            "pool"
        )
    if field == "memory":
        return "cannot limit a job's memory; leave compute.memory unset, or use a docker or kubernetes pool"
    return (
        "cannot run a job in an image: its jobs run in the worker's own Python environment; leave "
        "compute.image unset, or use a docker or kubernetes pool"
    )


def _variable_value(
    field: str, value: Any, pool_type: str, base_job_template: dict[str, Any], stage: str, pool: str
) -> Any:
    if field == "gpus" and pool_type == "docker":
        pinned = pinned_gpu_ids(base_job_template)
        if not pinned:
            return [gpu_request(count=value)]
        if value == 0:
            return []  # no request at all: one naming no device would leave the choice to the image
        if value > len(pinned):
            raise UserError(
                f"stage '{stage}', compute.gpus: {value} GPUs asked for, but {pool} has GPUs "
                f"{', '.join(pinned)} only"
            )
        return [gpu_request(ids=pinned[:value])]
    if field == "memory":
        return memory_quantity(value, pool_type)
    return dict(value) if field == "env" else value


MEMORY = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")


def memory_quantity(memory: str, pool_type: str) -> str:
    """``compute.memory`` in the pool's notation.

    Lower-case units are docker's and count in 1024s (``32g`` = ``32Gi``); ``Ki``/``Mi``/``Gi``/``Ti``
    are binary, ``K``/``M``/``G``/``T`` and ``KB``.. decimal. Kubernetes keeps the distinction
    (``32g`` -> ``32Gi``, ``32GB`` -> ``32G``); docker knows only binary units, so ``32G`` -> ``32g``.
    """
    number, unit = MEMORY.fullmatch(memory.strip()).groups()
    letter = unit[:1]
    if pool_type == "docker":
        if letter.lower() == "t":
            return f"{float(number) * 1024:g}g"
        return f"{number}{letter.lower() or 'b'}"
    if not letter:
        return number
    if unit.endswith("i") or letter.islower():
        return f"{number}{letter.upper()}i"
    return f"{number}{'k' if letter == 'K' else letter}"


def check_job_variables(
    values: dict[str, Any],
    base_job_template: dict[str, Any],
    origins: dict[str, str],
    where: str,
    pool_type: str,
    pool: str,
) -> None:
    """UserError listing every variable the template does not know or whose value its schema rejects
    (``origins``: variable -> the field that set it; ``pool``: how to name the pool in messages)."""
    from prefect.utilities.schema_tools import validate

    schema = base_job_template.get("variables", {})
    known = schema.get("properties", {})
    problems = [
        f"{where}, {origins.get(name, name)}: not a job variable of the template of {pool}; known: "
        f"{', '.join(sorted(known))}{_instead(name, pool_type)}"
        for name in sorted(set(values) - set(known))
    ]
    if not problems:
        for error in validate(values, schema, preprocess=True, ignore_required=True):
            path = list(error.absolute_path)
            field = origins.get(path[0], str(path[0])) if path else "compute.job_variables"
            rest = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path[1:])
            problems.append(f"{where}, {field}{rest} ({pool}): {error.message}")
    if problems:
        raise UserError("\n".join(problems))


def ensure_work_pool(
    name: str,
    pool_type: str = "process",
    concurrency_limit: int | None = None,
    overwrite: bool = False,
    image: str | None = DEFAULT_IMAGE,
    env: dict[str, str] | None = None,
    gpu_ids: list[str] | None = None,
) -> Literal["created", "updated", "unchanged"]:
    """Create the work pool ``name`` on the Prefect server with rlhf's template for ``pool_type``.

    An existing pool of that type is left as it is, unless ``overwrite``: then its template and
    concurrency limit are replaced. A pool's type cannot change (UserError). ``concurrency_limit``
    caps the flow runs of the whole pool; 1 on a one-GPU pool means one GPU never holds two stages.
    """
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    template = base_job_template(pool_type, image, env, gpu_ids)
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(name)
        except ObjectNotFound:
            create = WorkPoolCreate(
                name=name, type=pool_type, base_job_template=template, concurrency_limit=concurrency_limit
            )
            try:
                client.create_work_pool(create)
            except ObjectAlreadyExists:  # created meanwhile by another command
                return "unchanged"
            return "created"
        if existing.type != pool_type:
            raise UserError(
                f"work pool '{name}' is a {existing.type} pool, not {pool_type}, and a pool's type cannot "
                f"change: pick another name, or delete it first (prefect work-pool delete {name})"
            )
        if not overwrite:
            return "unchanged"
        update = WorkPoolUpdate(base_job_template=template, concurrency_limit=concurrency_limit)
        client.update_work_pool(name, update)
        return "updated"
