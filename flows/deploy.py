"""``rlhf deploy``: a pipeline and its stage runners as deployments on a running Prefect server.

What it creates (the server is the one ``PREFECT_API_URL`` points at):

- ``rlhf-stage/<pool>`` for every work pool a stage of the spec runs on (``compute.pool``, usually
  set by ``--profile``): the stage-runner flow (:mod:`flows.stage_runner`) that the pipeline submits
  those stages to;
- ``rlhf-pipeline/<pipeline name>`` on the pipeline's own pool (``--pool``, or the profile's
  ``pipeline_pool``), with the spec as written (validated; each run fills in its defaults) as its
  parameter, an optional cron schedule, and a parameter form: the seed and every number or switch
  the spec file sets, typed, by path (``stages.sft.train.lr``), plus the stages to force. A run
  started from the Prefect UI with other values runs the spec with those values
  (:func:`rlhf_core.spec.loading.apply_spec_overrides`).

Deployments name their flow by module path, so a worker runs the installed package (``pip install``
of this project, or its image), not a copy of the repository. Their version is the git commit of the
working tree ``rlhf deploy`` ran in: a worker runs outside git, so its runs record that commit in
their lineage (:func:`code_commit`). The pipeline's own pool may also run
stages only when it has no concurrency limit: the pipeline holds a slot while it waits for its stages
(and its workers must not be started with ``--limit 1`` then).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.code_version import UNKNOWN_COMMIT
from rlhf_core.errors import UserError
from rlhf_core.spec import PipelineSpec
from rlhf_core.spec.loading import MISSING, lookup_path

OVERRIDABLE_TYPES = {bool: "boolean", int: "integer", float: "number"}


@dataclass
class Deployed:
    name: str
    deployment_id: str
    pool: str
    schedule: str | None = None


def stage_pools(spec: PipelineSpec) -> list[str]:
    """The work pools the stages of ``spec`` run on, in stage order."""
    pools = (spec.compute_of(name).pool for name in spec.topological_order())
    return list(dict.fromkeys(p for p in pools if p is not None))


def require_prefect_server(what: str) -> str:
    """The API URL of the Prefect server; UserError when none is configured (no temporary server)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UserError(
            f"{what} needs a running Prefect server (work pools, workers and deployments live there): "
            "start one (prefect server start) and set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api"
        )
    return url


def deploy_pipeline(
    spec: PipelineSpec,
    raw_spec: dict[str, Any],
    *,
    pipeline_pool: str,
    home: str,
    schedule: str | None = None,
    timezone: str | None = None,
    tracking_uri: str | None = None,
) -> list[Deployed]:
    """Create or update the stage-runner deployments and the pipeline deployment; what was deployed."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.pipeline import run_pipeline
    from flows.stage_runner import run_stage

    require_prefect_server("rlhf deploy")
    pools = stage_pools(spec)
    limits = _check_pools_exist([pipeline_pool, *pools])
    if pipeline_pool in pools and limits[pipeline_pool] is not None:
        raise UserError(
            f"--pool {pipeline_pool}: the pipeline's own flow would share a pool that has a concurrency "
            f"limit ({limits[pipeline_pool]}) with its stages: it holds a slot while it waits for them, "
            "and they could wait for it. Run the pipeline on another pool (--pool, or pipeline_pool in "
            "the profile), or remove the pool's limit"
        )
    env = {"RLHF_TRACKING_URI": tracking_uri} if tracking_uri else {}
    from registry.tracking import git_commit

    version = git_commit()  # what code_commit() gives the runs of these deployments
    versioned = {"version": version} if version != UNKNOWN_COMMIT else {}
    deployed = []
    for pool in pools:
        runner = run_stage.to_deployment(
            name=pool,
            work_pool_name=pool,
            entrypoint_type=EntrypointType.MODULE_PATH,
            description=f"Runs one pipeline stage on work pool '{pool}' (submitted by rlhf-pipeline runs).",
            tags=["rlhf", "stage-runner"],
            job_variables={"env": env} if env else None,
            enforce_parameter_schema=False,
            **versioned,
        )
        deployed.append(Deployed(f"rlhf-stage/{pool}", str(runner.apply()), pool))
    schedules = [Cron(schedule, timezone=timezone or "UTC")] if schedule else None
    pipeline = run_pipeline.to_deployment(
        name=spec.name,
        work_pool_name=pipeline_pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        description=spec.description or f"RLHF pipeline {spec.name}",
        tags=["rlhf", f"pipeline:{spec.name}"],
        # what the file writes, so defaults that follow other fields still follow a run's overrides
        parameters={"spec": spec.model_dump(mode="json", exclude_unset=True), "home": home},
        schedules=schedules,
        job_variables={"env": env} if env else None,
        enforce_parameter_schema=False,
        **versioned,
    )
    pipeline_id = pipeline.apply()
    with get_client(sync_client=True) as client:
        client.update_deployment(
            pipeline_id,
            DeploymentUpdate(parameter_openapi_schema=parameter_form(spec, raw_spec, home)),
        )
    deployed.append(Deployed(f"rlhf-pipeline/{spec.name}", str(pipeline_id), pipeline_pool, schedule))
    return deployed


def _check_pools_exist(pools: list[str]) -> dict[str, int | None]:
    """Each pool's concurrency limit; UserError naming the pools the server does not have."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    missing, limits = [], {}
    with get_client(sync_client=True) as client:
        for pool in dict.fromkeys(pools):
            try:
                limits[pool] = client.read_work_pool(pool).concurrency_limit
            except ObjectNotFound:
                missing.append(pool)
    if missing:
        commands = "; ".join(f"rlhf pools create {p} --type process" for p in missing)
        raise UserError(f"no work pool named {', '.join(missing)} on the Prefect server; create: {commands}")
    return limits


def overridable_values(spec: PipelineSpec, raw_spec: dict[str, Any]) -> dict[str, Any]:
    """``path -> value`` for the seed and every number or switch the spec file sets in its stages."""
    resolved = spec.model_dump(mode="json")
    values: dict[str, Any] = {"seed": spec.seed}

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, [*path, str(key)])
        elif type(node) in OVERRIDABLE_TYPES and path[2:3] != ["compute"]:
            current = lookup_path(resolved, path)
            if current is not MISSING and type(current) is type(node):
                values[".".join(path)] = current

    for name, entry in (raw_spec.get("stages") or {}).items():
        walk(entry, ["stages", str(name)])
    return values


def parameter_form(spec: PipelineSpec, raw_spec: dict[str, Any], home: str) -> dict[str, Any]:
    """The deployment's parameter schema: what the Prefect UI shows as the form of a new run."""
    overrides = {
        path: {"title": path, "type": OVERRIDABLE_TYPES[type(value)], "default": value}
        for path, value in overridable_values(spec, raw_spec).items()
    }
    names = [*spec.models, *spec.topological_order()]
    return {
        "title": "Parameters",
        "type": "object",
        "properties": {
            "overrides": {
                "title": "Values of this run",
                "description": "Spec values by path; a changed value changes the fingerprints of the "
                "stages it reaches (the others come from cache).",
                "type": "object",
                "properties": overrides,
                "default": {path: field["default"] for path, field in overrides.items()},
                "position": 0,
            },
            "force": {
                "title": "Force",
                "description": "Stages (or models) to re-run with everything downstream, cached or not.",
                "type": "array",
                "items": {"type": "string", "enum": names},
                "default": [],
                "position": 1,
            },
            "home": {"title": "Home", "type": "string", "default": home, "position": 2},
            # Last: the UI shows an object without properties as a JSON editor as long as the spec.
            "spec": {
                "title": "Spec",
                "description": f"The validated spec of pipeline '{spec.name}' (set by rlhf deploy).",
                "type": "object",
                "position": 3,
            },
        },
        "required": ["spec"],
        "definitions": {},
    }


def default_home(home: Path | None) -> str:
    """The home a deployed pipeline uses: the given one, else $RLHF_HOME, else ./.rlhf (absolute)."""
    return str(Path(home or os.environ.get("RLHF_HOME") or ".rlhf").expanduser().resolve())
