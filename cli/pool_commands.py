"""``rlhf pools ...``: the Prefect work pools that run stages elsewhere (a stage's ``compute.pool``).

``rlhf pools create gpu --type process --concurrency 1`` creates a pool on the Prefect server that
``PREFECT_API_URL`` points at, with rlhf's job template for its type (``flows.work_pools``). The
concurrency limit caps the flow runs of the whole pool: on a pool with one GPU, ``--concurrency 1``
means one GPU never holds two training stages. The other half is on the workers: one worker per GPU,
each started with ``--limit 1`` and its own ``CUDA_VISIBLE_DEVICES``::

    CUDA_VISIBLE_DEVICES=0 prefect worker start --pool gpu --limit 1
    CUDA_VISIBLE_DEVICES=1 prefect worker start --pool gpu --limit 1

(a pool with N such workers takes ``--concurrency N``). A pool without a limit (``rlhf pools create
cpu``) is shared: it may run pipelines, which hold a slot while they wait for their stages, so its
workers take no ``--limit``; the printed advice follows the pool's limit. ``rlhf pools template
docker`` prints a template for ``prefect work-pool create --base-job-template FILE`` instead.

Prefect is imported inside the commands only, after the offline defaults are set (see ``cli.app``);
``flows.work_pools`` imports it lazily too.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from cli.console import console
from flows.work_pools import DEFAULT_IMAGE, base_job_template, ensure_work_pool
from rlhf_core.errors import EXIT_CRASH, EXIT_USER_ERROR, UserError
from rlhf_core.settings import RLHFSettings, apply_environment_defaults

pools_app = typer.Typer(
    no_args_is_help=True,
    help="Prefect work pools for stages that run elsewhere (compute.pool): create one, print a template.",
)


class PoolType(StrEnum):
    process = "process"
    docker = "docker"
    kubernetes = "kubernetes"


TypeOpt = Annotated[PoolType, typer.Option("--type", help="Work pool type.")]
ImageOpt = Annotated[
    str,
    typer.Option(
        "--image",
        help="Default job image of docker and kubernetes pools (a stage's compute.image overrides it); "
        "build it from the project's Dockerfile.",
    ),
]
EnvOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--env",
        help="KEY=VALUE every job of the pool gets (repeatable), e.g. RLHF_TRACKING_URI=http://mlflow:5000; "
        "container jobs do not inherit their worker's environment.",
    ),
]
GpuIdsOpt = Annotated[
    str | None,
    typer.Option(
        "--gpu-ids",
        help="Docker pools: the host GPUs (e.g. 0 or 2,3) this pool's jobs use. Docker hands out GPUs by "
        "count from GPU 0, so on a multi-GPU host make one pool per GPU (or GPU group).",
    ),
]
WORKER_PACKAGES = {
    "docker": "pip install 'prefect-docker>=0.7'",
    "kubernetes": "pip install prefect-kubernetes",
}


def worker_hint(pool_type: str, name: str, concurrency: int | None) -> str:
    """How to start the pool's workers, as docs/scaling.md section 3 says: a pool with a concurrency
    limit holds GPUs (one worker per GPU, each ``--limit 1``); a pool without one is shared (it may run
    the pipeline's own flow, which waits for its stages) and its workers take no ``--limit``."""
    kind = "" if pool_type == "process" else f" --type {pool_type}"
    install = f"{WORKER_PACKAGES[pool_type]}\n  " if pool_type in WORKER_PACKAGES else ""
    if pool_type == "kubernetes":  # the cluster's scheduler hands out GPUs: no pinning, no limit needed
        return f"{install}prefect worker start --pool {name}{kind}   # in the cluster"
    if concurrency is None:
        return (
            f"{install}prefect worker start --pool {name}{kind}   # no --limit: a pool without a "
            "concurrency limit is shared and may run pipelines, which wait for their stages"
        )
    if pool_type == "process":
        return (
            f"CUDA_VISIBLE_DEVICES=0 prefect worker start --pool {name} --limit 1   # one worker per GPU, "
            f"{concurrency} in all (CUDA_VISIBLE_DEVICES=1 for the next)"
        )
    return f"{install}prefect worker start --pool {name}{kind} --limit 1   # one worker per GPU host"


def _fail(message: str, status: int = EXIT_USER_ERROR) -> None:
    typer.secho(message, err=True, fg="red")
    raise typer.Exit(status)


def _gpu_ids(text: str | None) -> list[str] | None:
    ids = [i.strip() for i in (text or "").split(",") if i.strip()]
    return ids or None


def _environment(pairs: list[str] | None) -> dict[str, str]:
    from rlhf_core.spec.compute import ENV_NAME

    env = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not ENV_NAME.match(key):
            _fail(f"--env {pair}: expected KEY=VALUE with KEY an environment variable name")
        env[key] = value
    return env


@pools_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Work pool name (what a stage's compute.pool names).")],
    pool_type: TypeOpt = PoolType.process,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            min=0,
            help="Flow runs the whole pool runs at once (1 on a one-GPU pool: one GPU never holds two "
            "training stages). Default: no limit.",
        ),
    ] = None,
    image: ImageOpt = DEFAULT_IMAGE,
    env: EnvOpt = None,
    gpu_ids: GpuIdsOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the template and limit of an existing pool.")
    ] = False,
    home: Annotated[
        Path | None, typer.Option("--home", help="State dir (default $RLHF_HOME or ./.rlhf).")
    ] = None,
) -> None:
    """Create a work pool on the Prefect server of PREFECT_API_URL, with rlhf's job template."""
    environment = _environment(env)
    apply_environment_defaults(RLHFSettings(home=home) if home else RLHFSettings())
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if not api_url:
        _fail(
            "PREFECT_API_URL is not set: work pools live on a Prefect server that workers can reach. Start "
            "one (prefect server start --host 0.0.0.0) and export PREFECT_API_URL=http://HOST:4200/api"
        )
    try:
        outcome = ensure_work_pool(
            name, pool_type.value, concurrency, overwrite, image, environment, _gpu_ids(gpu_ids)
        )
    except UserError as exc:
        _fail(str(exc))
    except Exception as exc:  # server unreachable or refusing: an environment failure, one line
        _fail(f"could not create work pool '{name}' on {api_url}: {type(exc).__name__}: {exc}", EXIT_CRASH)
    limit = "no concurrency limit" if concurrency is None else f"concurrency limit {concurrency}"
    if outcome == "unchanged":
        console.print(f"work pool '{name}' exists already, left as it is (--overwrite replaces it)")
    else:
        console.print(f"work pool '{name}' ({pool_type.value}, {limit}) {outcome} on {api_url}")
    console.print("start its worker(s) with:\n  " + worker_hint(pool_type.value, name, concurrency))


@pools_app.command("template")
def template(
    pool_type: Annotated[PoolType, typer.Argument(help="Work pool type.")],
    image: ImageOpt = DEFAULT_IMAGE,
    env: EnvOpt = None,
    gpu_ids: GpuIdsOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write it to this file instead of stdout.")
    ] = None,
) -> None:
    """Print rlhf's base job template for a pool type (for prefect work-pool create --base-job-template)."""
    environment = _environment(env)
    apply_environment_defaults(RLHFSettings())  # before base_job_template imports prefect
    try:
        job_template = base_job_template(pool_type.value, image, environment, _gpu_ids(gpu_ids))
    except UserError as exc:
        _fail(str(exc))
    text = json.dumps(job_template, indent=2)
    if output is None:
        typer.echo(text)
    else:
        output.write_text(text + "\n")
        typer.echo(f"wrote {output}", err=True)
