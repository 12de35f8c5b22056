"""``rlhf ui``: both UIs of a home come up on 127.0.0.1, the Prefect UI finds its API, Ctrl-C stops both."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=3) as response:
        return response.status, response.read().decode(errors="replace")


def _wait_for(url: str, process: subprocess.Popen, deadline: float) -> str:
    while time.monotonic() < deadline:
        assert process.poll() is None, f"rlhf ui exited early:\n{process.stdout.read()}"
        try:
            status, body = _get(url)
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.5)
    logs = {p.name: p.read_text()[-3000:] for p in sorted(getattr(_wait_for, "logs", Path()).glob("*.log"))}
    raise AssertionError(f"{url} did not answer in time; server logs: {logs}")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ctrl_c_as_in_a_terminal() -> None:
    """In the child: SIGINT handled by default, as in a terminal. A test runner started in the background
    of a non-interactive shell (`.ci/run &`) ignores SIGINT, its children inherit that, and Python then
    installs no KeyboardInterrupt handler: Ctrl-C would do nothing (seen in a CI run)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_rlhf_ui_serves_both_uis_of_the_home_and_stops_on_ctrl_c(tmp_path):
    home = tmp_path / "home"
    prefect_port, mlflow_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_HOME"))}
    env["PYTHONUNBUFFERED"] = "1"  # its lines reach the pipe as they are printed
    command = [sys.executable, "-m", "cli.app", "ui", "--home", str(home)]
    command += ["--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )  # fmt: skip
    lines: list[str] = []  # its output, read as it comes (the URLs are printed once both answer)
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240  # ~30 s on an idle 2-core machine
        _wait_for.logs = home / "logs"
        health = _wait_for(f"http://127.0.0.1:{prefect_port}/api/health", process, deadline)
        assert health.strip() == "true"
        # The UI in the browser asks /ui-settings where its API is: it must be this server's own port.
        settings = json.loads(_wait_for(f"http://127.0.0.1:{prefect_port}/ui-settings", process, deadline))
        assert settings["api_url"] == f"http://127.0.0.1:{prefect_port}/api"
        assert "<html" in _wait_for(f"http://127.0.0.1:{prefect_port}/", process, deadline).lower()
        page = _wait_for(f"http://127.0.0.1:{mlflow_port}/", process, deadline)
        assert "mlflow" in page.lower()
        # the MLflow server reads the home's store: its (migrated) database lies under the home
        assert (home / "mlflow.db").exists() and (home / "prefect" / "prefect.db").exists()
        # `rlhf ui` prints the URLs once its own check of both servers is done (it polls too): wait for them
        while "MLflow UI:" not in "".join(lines) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=90)  # rlhf ui stops each server: TERM, up to 10 s, then KILL (5 s)
        reader.join(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = "".join(lines)
    assert process.returncode == 0, output
    assert f"Prefect UI: http://127.0.0.1:{prefect_port} " in output
    assert f"http://127.0.0.1:{mlflow_port}/#/experiments?workflowType=machine_learning" in output
    assert not _listening(prefect_port) and not _listening(mlflow_port), "a server outlived rlhf ui"


def test_rlhf_ui_refuses_a_port_in_use(tmp_path):
    from typer.testing import CliRunner

    from cli.app import app

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["ui", "--home", str(tmp_path), "--prefect-port", str(port)])
    assert result.exit_code == 2
    assert f"--prefect-port: port {port} on 127.0.0.1 is in use" in result.output
