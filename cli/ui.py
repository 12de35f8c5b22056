"""``rlhf ui``: the Prefect UI and the MLflow UI of a project's home, on this machine only.

What it starts (both bound to 127.0.0.1, never to other interfaces):

- a Prefect server on the home's Prefect database (``<home>/prefect/prefect.db``, the one ``rlhf run``
  writes to), with ``PREFECT_API_URL`` and ``PREFECT_SERVER_UI_API_URL`` pointing at its own port, so
  the UI in the browser finds its API on any port (a plain ``prefect server start`` on another port
  shows "Can't connect to Server API" until the latter is set);
- an MLflow server on the home's tracking store and artifact root. MLflow 3's UI opens in its GenAI
  view unless the page is asked for the model-training one (``?workflowType=machine_learning``, which
  the printed URLs carry; pipeline experiments are also tagged ``mlflow.experimentKind`` =
  ``custom_model_development``, see ``registry.tracking``).

Both stop on Ctrl-C (or SIGTERM). The servers' own output goes to ``<home>/logs/``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import webbrowser
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from rlhf_core.child_processes import parent_death_signal
from rlhf_core.errors import EXIT_CRASH, EXIT_USER_ERROR, UserError
from rlhf_core.settings import RLHFSettings, apply_environment_defaults

HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT, DEFAULT_MLFLOW_PORT = 4200, 5000
MODEL_TRAINING_VIEW = "workflowType=machine_learning"  # the MLflow UI's model-training view
STARTUP_TIMEOUT_S = 180.0


@dataclass
class Server:
    """One server process: its name, the URL that answers once it is ready, where its output goes."""

    name: str
    command: list[str]
    env: dict[str, str]
    ready_url: str
    log_path: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # A session of its own: Ctrl-C reaches this process only, which stops the server's whole group.
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=parent_death_signal(),  # SIGTERM the server if `rlhf ui` itself is killed
            )

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.ready_url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the server's process group, then SIGKILL what is left after ``grace_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def prefect_server(settings: RLHFSettings, port: int) -> Server:
    """The Prefect server of the home; its UI calls its API on the same loopback port."""
    api = f"http://{HOST}:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(settings.resolved_prefect_home())),
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_UI_API_URL": api,
        "PREFECT_UI_URL": f"http://{HOST}:{port}",
        # Fingerprint-lock leases (runtime.fingerprint_lock) must survive a restart of this server, or a
        # slot held at the restart would stay taken for good.
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": os.environ.get(
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.filesystem"
        ),
    }
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    log = settings.resolved_home() / "logs" / "prefect-server.log"
    return Server("Prefect", command, env, f"{api}/health", log)


def mlflow_server(settings: RLHFSettings, port: int) -> Server:
    """An MLflow server on the home's tracking store (also the registry) and artifact root."""
    store = settings.resolved_tracking_uri()
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1",
        "--backend-store-uri", store, "--registry-store-uri", store,
        "--default-artifact-root", settings.resolved_artifact_location(),
    ]  # fmt: skip
    log = settings.resolved_home() / "logs" / "mlflow-server.log"
    # MLflow's job runner (six huey consumer processes, ~1.7 GB) serves GenAI features a training
    # pipeline does not use; set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to have it anyway.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    return Server("MLflow", command, env, f"http://{HOST}:{port}/health", log)


def mlflow_page(base: str, page: str = "#/experiments") -> str:
    """A URL of the MLflow UI that opens in its model-training view."""
    return f"{base.rstrip('/')}/{page}{'&' if '?' in page else '?'}{MODEL_TRAINING_VIEW}"


def wait_until_ready(servers: list[Server], timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll until every server answers; a server that exits (or a timeout) raises with its log's tail."""
    deadline = time.monotonic() + timeout_s
    waiting = list(servers)
    while waiting:
        for server in list(waiting):
            if server.exited() is not None:
                raise RuntimeError(
                    f"the {server.name} server exited with status {server.exited()} "
                    f"(log {server.log_path}):\n{server.log_tail()}"
                )
            if server.answers():
                waiting.remove(server)
        if waiting and time.monotonic() > deadline:
            names = ", ".join(s.name for s in waiting)
            raise RuntimeError(
                f"{names} did not answer within {timeout_s:.0f} s (logs in {waiting[0].log_path.parent})"
            )
        if waiting:
            time.sleep(0.5)


def _stop_on_sigterm() -> None:
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def serve(settings: RLHFSettings, prefect_port: int, mlflow_port: int, open_browser: bool = False) -> None:
    """Start both servers, print their URLs, and keep them up until Ctrl-C; then stop both."""
    local_store = not settings.resolved_tracking_uri().startswith(("http://", "https://"))
    for option, port, needed in (
        ("--prefect-port", prefect_port, True),
        ("--mlflow-port", mlflow_port, local_store),
    ):
        if needed and not port_is_free(port):
            raise UserError(f"{option}: port {port} on {HOST} is in use (choose another with {option})")
    _prepare_stores(settings, local_store)
    servers = [prefect_server(settings, prefect_port)]
    if local_store:
        servers.append(mlflow_server(settings, mlflow_port))
    mlflow_base = f"http://{HOST}:{mlflow_port}" if local_store else settings.resolved_tracking_uri()
    _stop_on_sigterm()
    try:
        for server in servers:
            server.start()
        typer.echo(f"starting the Prefect and MLflow UIs of {settings.resolved_home()} ...")
        wait_until_ready(servers)
        _print_urls(settings, prefect_port, mlflow_base)
        if open_browser:
            webbrowser.open(f"http://{HOST}:{prefect_port}")
            webbrowser.open(mlflow_page(mlflow_base))
        while all(s.exited() is None for s in servers):
            time.sleep(0.5)
        stopped = next(s for s in servers if s.exited() is not None)
        raise RuntimeError(
            f"the {stopped.name} server stopped (log {stopped.log_path}):\n{stopped.log_tail()}"
        )
    except KeyboardInterrupt:
        typer.echo("stopping the UIs ...")
    finally:
        for server in servers:
            server.stop()


def _prepare_stores(settings: RLHFSettings, local_store: bool) -> None:
    """Create (migrate) the home's MLflow store first, under the lock ``rlhf run`` takes too. (The Prefect
    server migrates its own database as it starts, in the environment given to it.)"""
    if local_store:
        from registry import tracking

        tracking.configure(settings)


def _print_urls(settings: RLHFSettings, prefect_port: int, mlflow_base: str) -> None:
    prefect = f"http://{HOST}:{prefect_port}"
    typer.echo(
        f"\nPrefect UI: {prefect}   (flow runs named <pipeline>-<spec digest>-<time>, one task run and "
        f"one result artifact per stage)\n"
        f"MLflow UI:  {mlflow_page(mlflow_base)}   (one experiment per pipeline; Model registry: "
        f"{mlflow_page(mlflow_base, '#/models')})\n"
        f"\nTo watch the next run live in the Prefect UI, send it to this server:\n"
        f"  PREFECT_API_URL={prefect}/api rlhf run <spec> --home {settings.resolved_home()}\n"
    )
    if prefect_port != DEFAULT_PREFECT_PORT or mlflow_base != f"http://{HOST}:{DEFAULT_MLFLOW_PORT}":
        typer.echo(
            "Links written by pipeline runs point at the default ports; for these ones, run pipelines with\n"
            f"  RLHF_PREFECT_UI_URL={prefect} RLHF_MLFLOW_UI_URL={mlflow_base}\n"
        )
    typer.echo("Ctrl-C stops both.")


HomeOpt = Annotated[Path | None, typer.Option("--home", help="State dir (default $RLHF_HOME or ./.rlhf).")]


def ui(
    home: HomeOpt = None,
    prefect_port: Annotated[int, typer.Option(help="Port of the Prefect UI and API.")] = DEFAULT_PREFECT_PORT,
    mlflow_port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = DEFAULT_MLFLOW_PORT,
    open_browser: Annotated[bool, typer.Option("--open", help="Open both UIs in the browser.")] = False,
) -> None:
    """Open the Prefect and MLflow UIs of the home on 127.0.0.1 (Ctrl-C stops them)."""
    settings = RLHFSettings(home=home) if home else RLHFSettings()
    apply_environment_defaults(settings)  # before Prefect is imported: PREFECT_HOME of this home
    try:
        serve(settings, prefect_port, mlflow_port, open_browser)
    except UserError as exc:
        typer.secho(str(exc), err=True, fg="red")
        raise typer.Exit(EXIT_USER_ERROR) from None
    except RuntimeError as exc:  # a server did not start or stopped by itself; its log says why
        typer.secho(str(exc), err=True, fg="red")
        raise typer.Exit(EXIT_CRASH) from None
