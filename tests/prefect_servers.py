"""Real Prefect servers and workers for tests, each a subprocess in its own session.

``prefect_server`` runs ``prefect server start`` (not the ephemeral server or ``prefect_test_harness``):
only a real server runs the background services, among them the repossessor that frees the slots of
an expired concurrency lease and the scheduler. Leases are kept on disk
(``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE``), so they survive a server restart.

Everything is stopped by process group in ``finally``: TERM, then KILL. A fresh server is ready in
~15-25 s on a 2-core machine (database migrations): the tests share one per session
(``real_prefect_server`` in conftest).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_core.settings import OFFLINE_DEFAULTS

PREFECT = str(Path(sys.executable).with_name("prefect"))
STARTUP_TIMEOUT_S = 180.0
FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"
# Settings that would make a subprocess talk to another server, or read another profile.
INHERITED_PREFECT = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "PREFECT_HOME")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env(prefect_home: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in INHERITED_PREFECT}
    env.update(OFFLINE_DEFAULTS)
    env["PREFECT_HOME"] = str(prefect_home)
    env.update(extra)
    return env


def stop_group(proc: subprocess.Popen, term_tries: int = 2, grace_s: float = 10.0) -> None:
    """TERM the process group (twice: a background worker ignores the first), then KILL it; reap."""
    for _ in range(term_tries):
        if proc.poll() is not None:
            break
        _signal_group(proc, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s / term_tries)
    _signal_group(proc, signal.SIGKILL)  # also children that outlived the leader
    proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # started with start_new_session: pgid == pid


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


@dataclass
class PrefectServer:
    """A ``prefect server start`` on 127.0.0.1. ``stop()`` then ``start()`` restarts it on the same port
    with the same database and lease storage (a server blip)."""

    port: int
    home: Path = field(repr=False)
    client_home: Path = field(repr=False)
    log_path: Path = field(repr=False)
    server_env: dict[str, str] = field(repr=False)
    proc: subprocess.Popen | None = field(default=None, repr=False)
    startup_seconds: float = 0.0

    @property
    def url(self) -> str:
        """The API URL (``http://127.0.0.1:PORT/api``): what ``PREFECT_API_URL`` is set to."""
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def env(self) -> dict[str, str]:
        """What a client subprocess needs (merge into ``os.environ``): the API URL, its own PREFECT_HOME
        and the offline defaults."""
        return {**OFFLINE_DEFAULTS, "PREFECT_API_URL": self.url, "PREFECT_HOME": str(self.client_home)}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> None:
        """Start the server (appending to its log); return once ``/api/health`` answers."""
        command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command,
                env=self.server_env,
                cwd=self.log_path.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_healthy(self.url, self.proc, self.log_path, STARTUP_TIMEOUT_S)
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)

    def ensure_running(self) -> PrefectServer:
        """This server, started again if it was stopped (a test of a restart that failed midway)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout_s:.0f} s:\n{_tail(log_path)}")


@contextmanager
def prefect_server(
    tmp_path: Path, database_url: str | None = None, *, env: dict[str, str] | None = None
) -> Iterator[PrefectServer]:
    """A real Prefect server for the duration of the block.

    ``database_url``: ``PREFECT_SERVER_DATABASE_CONNECTION_URL`` (e.g. ``postgresql+asyncpg://...``);
    default SQLite in the server's own PREFECT_HOME under ``tmp_path``. ``env``: more server settings
    (e.g. ``PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS``). The UI is off unless ``env`` turns it on.
    """
    port = free_port()
    root = Path(tmp_path) / f"prefect-server-{port}"
    home, client_home = root / "server-home", root / "client-home"
    home.mkdir(parents=True)
    client_home.mkdir()
    settings = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": FILESYSTEM_LEASES,
        **({"PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url} if database_url else {}),
        **(env or {}),
    }
    server = PrefectServer(port, home, client_home, root / "server.log", _base_env(home, settings))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@dataclass
class Worker:
    """A running ``prefect worker start`` (process type)."""

    pool: str
    log_path: Path = field(repr=False)
    proc: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL the worker's whole process group. Flow-run processes it started run in sessions of
        their own (Prefect isolates them) and are not in that group."""
        _signal_group(self.proc, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        stop_group(self.proc)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def prefect_worker(
    server: PrefectServer,
    pool: str,
    *,
    env: dict[str, str] | None = None,
    limit: int | None = None,
    cwd: Path | str | None = None,
) -> Iterator[Worker]:
    """``prefect worker start --pool POOL --type process`` against ``server`` for the block.

    ``env`` is added to the worker's environment (flow runs inherit it). The worker polls every 2 s
    (``PREFECT_WORKER_QUERY_SECONDS``, unless ``env`` says otherwise). Logs go to a file beside the
    server's (``.log_text()``).
    """
    log_path = server.log_path.with_name(f"worker-{pool}-{free_port()}.log")
    command = [PREFECT, "worker", "start", "--pool", pool, "--type", "process"]
    if limit is not None:
        command += ["--limit", str(limit)]
    worker_env = {
        **os.environ,
        **server.env(),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            env={k: v for k, v in worker_env.items() if k not in ("PREFECT_API_KEY", "PREFECT_PROFILE")},
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield Worker(pool, log_path, proc)
    finally:
        stop_group(proc)
