"""``rlhf serve MODEL``: an OpenAI-compatible endpoint for a registered model version, a checkpoint
directory or a hub model, so a person can talk to ``models:/policy@champion`` and an LLM judge can use
a registered model (issue 19).

MODEL is one of:

- ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: resolved in the home's Model Registry now
  (``--home``), downloaded once into ``<home>/cache/models/`` the way stage inputs are;
- a local directory written by ``save_pretrained`` (a checkpoint);
- a hub name (offline unless ``HF_HUB_OFFLINE=0``).

Engines: ``native`` loads the model in this process and decodes with the project's own loop
(``rlhf_core.serving.openai_server``); ``vllm`` starts vLLM's OpenAI server from the engine environment
(``rlhf_core.rollout.engines``); ``auto`` picks vllm when that environment is installed. Either way the
server answers ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` under the name MODEL,
listens on 127.0.0.1 unless ``--host`` says otherwise, and stops on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from cli.console import exit_status, settings_for
from rlhf_core.errors import UserError
from rlhf_core.serving.listening import base_url, bind_socket, check_port_free
from rlhf_core.settings import OFFLINE_DEFAULTS

REGISTRY_PREFIX = "models:/"
LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")  # a MODEL written like this is a path, never a hub name
VLLM_LOG = "serve-vllm.log"


class ServeEngine(StrEnum):
    auto = "auto"
    native = "native"
    vllm = "vllm"


def serve(
    model: Annotated[
        str,
        typer.Argument(
            help="models:/<name>@<alias>, models:/<name>/<version>, a checkpoint directory, or a hub name."
        ),
    ],
    engine: Annotated[
        ServeEngine,
        typer.Option("--engine", help="vllm where its environment is installed (auto), else native."),
    ] = ServeEngine.auto,
    host: Annotated[
        str, typer.Option("--host", help="Interface to listen on; 0.0.0.0 exposes it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    home: Annotated[
        Path | None, typer.Option("--home", help="State dir (default $RLHF_HOME or ./.rlhf).")
    ] = None,
    vllm_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--vllm-arg", help="Extra argument for the vLLM server, e.g. --vllm-arg=--enforce-eager."
        ),
    ] = None,
    traceback_: Annotated[
        bool, typer.Option("--traceback", envvar="RLHF_TRACEBACK", help="Show full tracebacks.")
    ] = False,
) -> None:
    """Serve a model behind an OpenAI-compatible API (chat and completions) until Ctrl-C."""
    for key, value in OFFLINE_DEFAULTS.items():  # before transformers or MLflow load
        os.environ.setdefault(key, value)
    try:
        with exit_status(traceback_, f"rlhf serve {model}: "), stop_on_sigterm():
            chosen = choose_engine(engine)
            directory = resolve_model_source(model, home)
            if chosen is ServeEngine.vllm:
                serve_with_vllm(directory, model, host, port, home, tuple(vllm_arg or ()))
            else:
                serve_natively(directory, model, host, port)
    except KeyboardInterrupt:
        typer.echo(f"rlhf serve {model}: stopped")


def choose_engine(engine: ServeEngine) -> ServeEngine:
    """``auto`` -> vllm when the engine environment is installed, else native; vllm asked for must exist."""
    from rlhf_core.rollout.engines.vllm_environment import (
        PYTHON_VARIABLE,
        default_environment_dir,
        vllm_python,
    )

    python = vllm_python()
    installed = python is not None and python.exists()
    if engine is ServeEngine.auto:
        return ServeEngine.vllm if installed else ServeEngine.native
    if engine is ServeEngine.vllm and not installed:
        where = f"{PYTHON_VARIABLE}={python} does not exist" if python else "no vLLM environment is installed"
        raise UserError(
            f"option --engine vllm: {where}. Install one at {default_environment_dir()} or point "
            f"{PYTHON_VARIABLE} at the python of an environment with vLLM; or use --engine native"
        )
    return engine


def resolve_model_source(model: str, home: Path | None) -> str:
    """A local directory for a registry URI or a checkpoint; a hub name is returned as it is."""
    if model.startswith(REGISTRY_PREFIX):
        return download_registered_model(model, home)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"argument MODEL: {path} is not a saved model directory (it has no config.json)")
        return str(path.resolve())
    if model.startswith(LOCAL_PATH_PREFIXES):
        raise UserError(f"argument MODEL: no such directory: {path}")
    return model  # a hub name


def download_registered_model(uri: str, home: Path | None) -> str:
    """The registered version ``uri`` names (an alias resolved now), downloaded once into the home's model
    cache, keyed by the pinned ``models:/<name>/<version>`` (a registered version never changes)."""
    from cli.model_commands import connect

    settings = connect(home)
    from registry.lineage import resolve_version
    from registry.models import materialize_model, model_version_tags
    from rlhf_core.refs import ModelRef

    version = resolve_version(uri)
    role = model_version_tags(version.name, version.version).get("rlhf.role", "policy")
    if role not in ("policy", "judge"):
        raise UserError(
            f"argument MODEL: {uri} is a {role} model; only policies and judges (causal LMs) can be served"
        )
    pinned = hashlib.sha256(version.uri.encode()).hexdigest()
    ref = ModelRef(
        uri=version.uri, digest=pinned, tokenizer_digest=pinned, stage="serve", base_model=version.uri
    )
    directory = materialize_model(ref, settings.resolved_home() / "cache" / "models")
    typer.echo(f"{uri} is {version.uri}, downloaded to {directory}")
    return directory


def serve_natively(directory: str, name: str, host: str, port: int) -> None:
    """Load the model here and serve it until SIGINT/SIGTERM; the socket is bound before the load."""
    sock = bind_socket(host, port)
    from rlhf_core.serving.openai_server import load_served_model, serve_forever

    try:
        served = load_served_model(directory, name)
    except OSError as exc:  # a hub name not in the local cache (offline), a broken checkpoint
        raise UserError(f"argument MODEL: cannot load {directory!r}: {exc}") from None
    serve_forever(served, sock, on_ready=lambda: announce_ready(name, host, port, "native"))


def serve_with_vllm(
    directory: str, name: str, host: str, port: int, home: Path | None, extra_args: tuple[str, ...]
) -> None:
    """Start vLLM's OpenAI server on the model, report it ready, keep it up until SIGINT/SIGTERM or until it
    dies (an EngineError quoting its log), and stop its whole process group."""
    from rlhf_core.rollout.engines.base import EngineError
    from rlhf_core.rollout.engines.vllm_environment import has_cuda, vllm_python
    from rlhf_core.rollout.engines.vllm_server import ServerSettings, VLLMServer

    check_port_free(host, port)
    settings = ServerSettings(
        host=host,
        port=port,
        chunked_prefill=has_cuda(),
        extra_args=("--served-model-name", name, *extra_args),
    )
    log = settings_for(home).resolved_home() / "logs" / VLLM_LOG
    typer.echo(f"starting vLLM on {directory} (log: {log})")
    server = VLLMServer(vllm_python(), Path(directory), settings, log, what=f"rlhf serve {name}, engine vllm")
    try:
        server.start()
        announce_ready(name, host, port, "vllm")
        while server.process.poll() is None:
            time.sleep(1.0)
        raise EngineError(
            f"rlhf serve {name}, engine vllm: the vLLM server exited with status "
            f"{server.process.returncode}. {server.diagnosis()}"
        )
    finally:
        server.stop()  # the whole process group
        server.client.close()


def announce_ready(name: str, host: str, port: int, engine: str) -> None:
    """One line with what a client needs: the base URL and the model name to send."""
    typer.echo(f"ready: {base_url(host, port)} serves model '{name}' (engine {engine}; Ctrl-C stops it)")


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM stops the server as Ctrl-C does (a KeyboardInterrupt), so the same clean-up runs."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
