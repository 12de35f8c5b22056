"""Throwaway tracking servers for tests: a PostgreSQL 15 database and a real ``mlflow server``.

Both are started as separate processes and stopped by PID in ``finally`` (PostgreSQL by its
postmaster PID, ``mlflow server`` by its process group, which holds the forked workers as well).

- ``postgres_database(tmp_path)``: ``initdb`` as the ``postgres`` user, trust authentication on
  127.0.0.1 only (``-A trust`` is acceptable because nothing else can reach loopback), ``fsync=off``;
  yields ``postgresql://postgres@127.0.0.1:PORT/mlflow``. Skips the test when not root or when no
  PostgreSQL binaries are installed.
- ``mlflow_server(tmp_path, backend_store_uri)``: ``mlflow server`` with proxied artifacts
  (``--artifacts-destination``), one worker, on a free loopback port; ``.stop()`` and ``.start()``
  restart it on the same port with the same stores.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prefect_servers import free_port  # one free-port helper for every server the tests start

POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def _postgres_bin() -> Path:
    found = sorted(Path("/").glob(POSTGRES_BIN_GLOB.lstrip("/")), key=lambda p: int(p.parent.name))
    if not found or not (found[-1] / "initdb").exists():
        pytest.skip(f"no PostgreSQL server binaries ({POSTGRES_BIN_GLOB}/initdb)")
    if os.geteuid() != 0:
        pytest.skip("a throwaway PostgreSQL needs root (initdb runs as the 'postgres' user via runuser)")
    return found[-1]


def _as_postgres(*command: str | Path, timeout: float = 120) -> None:
    result = subprocess.run(
        ["runuser", "-u", "postgres", "--", *map(str, command)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@contextmanager
def postgres_database(tmp_path: Path, name: str = "mlflow") -> Iterator[str]:
    """A fresh PostgreSQL cluster with one database ``name``; yields its ``postgresql://`` URI.

    The cluster lives in its own directory under the system temp dir (pytest's ``tmp_path`` is not
    readable by the ``postgres`` user); its server log is copied to ``tmp_path/postgres.log`` at the end.
    """
    pgbin = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="rlhf-pg-"))
    shutil.chown(root, "postgres", "postgres")
    root.chmod(0o700)
    data, log, port = root / "data", root / "server.log", free_port()
    pid = None
    try:
        _as_postgres(
            pgbin / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale"
        )
        options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c full_page_writes=off"
        try:
            _as_postgres(pgbin / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o", options, "start")
        finally:
            if (data / "postmaster.pid").exists():
                pid = int((data / "postmaster.pid").read_text().split()[0])
        subprocess.run(
            [pgbin / "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1",
             "-c", f'CREATE DATABASE "{name}"'],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        yield f"postgresql://postgres@127.0.0.1:{port}/{name}"
    finally:
        if pid is not None:
            _stop_postmaster(pid)
        if log.exists():
            shutil.copyfile(log, tmp_path / "postgres.log")
        shutil.rmtree(root, ignore_errors=True)


def _stop_postmaster(pid: int) -> None:
    """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL: always by the postmaster's PID."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGQUIT, 10), (signal.SIGKILL, 10)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if _wait_gone(pid, wait):
            return


@dataclass
class MlflowServer:
    """One ``mlflow server`` process group on 127.0.0.1; ``start``/``stop`` keep its port and stores."""

    backend_store_uri: str
    artifacts_dir: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(Path(sys.executable).with_name("mlflow")), "server",
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", str(self.artifacts_dir),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip

    def start(self, timeout: float = 120) -> None:
        """Start the server (in its own session) and wait until ``/health`` answers."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("mlflow server is already running")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
        # no job runner: six huey consumer processes (~1.7 GB, CPU at start) for GenAI features we never use
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"mlflow server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL to whatever is left after 15 s."""
        if self.process is None:
            return
        pgid = self.process.pid  # the session leader: its PID is the group id
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if _group_gone(pgid, wait):
                break
        self.process.wait(timeout=10)
        self.process = None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def _group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@contextmanager
def mlflow_server(
    tmp_path: Path, backend_store_uri: str, artifacts_dir: Path | None = None
) -> Iterator[MlflowServer]:
    """A running ``mlflow server`` with proxied artifacts (``mlflow-artifacts:/``), stopped in ``finally``."""
    artifacts = artifacts_dir or tmp_path / "mlflow-server-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(backend_store_uri, artifacts, tmp_path / "mlflow-server.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()
