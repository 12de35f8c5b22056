"""The fingerprint lock: one training per fingerprint across machines (a real Prefect server), and on
one host without one.

Each contender is a subprocess doing what ``runtime.stage_execution`` does: check the cache (a marker
file) -> lock -> check again -> "train" (sleep, then write the marker). Contenders with different RLHF
homes have different file locks, like two machines: only the server's concurrency limit keeps them
apart. Events go to a shared log with timestamps, so a test can tell who trained, who waited and when.
"""

from __future__ import annotations

import contextvars
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rlhf_core.errors import UserError
from runtime.fingerprint_lock import (
    LEASE_SECONDS_ENV,
    RENEW_SECONDS_ENV,
    ensure_limit,
    lease_seconds,
    limit_name,
    lock_is_held,
    renew_seconds,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
LEASE = 60  # the shortest lease the server accepts
CONTENDER = r"""
import logging, sys, time
from pathlib import Path

logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from rlhf_core.settings import RLHFSettings
from runtime.fingerprint_lock import fingerprint_lock

home, fingerprint, shared, label, train_seconds, after = sys.argv[1:7]
shared = Path(shared)
marker = shared / "marker"

def note(event):
    with open(shared / "events.log", "a") as log:
        log.write(f"{label} {event} {time.time():.3f}\n")

while after != "-" and not (shared / after).exists():  # start contending once the other one holds it
    time.sleep(0.05)
if marker.exists():
    note("cached-before-lock")
    sys.exit(0)
with fingerprint_lock(RLHFSettings(home=Path(home)), fingerprint, "sft"):
    note("locked")
    (shared / f"{label}.locked").touch()
    if marker.exists():
        note("cached-after-lock")
    else:
        note("train-start")
        done = time.time() + float(train_seconds)  # or earlier, when the test says stop
        while time.time() < done and not (shared / f"{label}.stop").exists():
            time.sleep(0.1)
        marker.write_text(label)
        note("train-end")
"""


@pytest.fixture
def server(real_prefect_server):
    """The session's real server (conftest): its repossessor looks for expired leases every second and
    a waiter retries at least every second."""
    return real_prefect_server.ensure_running()


@pytest.fixture
def api(server):
    """This process talks to the module's server (for lock_is_held and ensure_limit)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.url}):
        yield server


class Contender:
    """One contender subprocess in its own session (killed by process group)."""

    def __init__(self, env, home, fingerprint, shared, label, train_seconds, after="-"):
        args = [home, fingerprint, shared, label, str(train_seconds), after]
        self.stderr_path = Path(shared) / f"{label}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CONTENDER, *map(str, args)],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )

    def wait(self, timeout):
        return self.proc.wait(timeout=timeout)

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stderr(self):
        return self.stderr_path.read_text(errors="replace")


def events(shared: Path) -> dict[str, list[tuple[str, float]]]:
    """label -> [(event, time)] in order."""
    out: dict[str, list[tuple[str, float]]] = {}
    path = shared / "events.log"
    for line in path.read_text().splitlines() if path.exists() else []:
        label, event, stamp = line.split()
        out.setdefault(label, []).append((event, float(stamp)))
    return out


def when(shared: Path, label: str, event: str) -> float | None:
    return next((t for e, t in events(shared).get(label, []) if e == event), None)


def client_env(server=None, lease=LEASE) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(server.env() if server is not None else {})
    env.update({LEASE_SECONDS_ENV: str(lease), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.e2e
def test_two_machines_same_fingerprint_train_once(api, tmp_path):
    fingerprint = "a1" * 32
    env = client_env(api)
    a = Contender(env, tmp_path / "home-a", fingerprint, tmp_path, "A", train_seconds=4)
    b = Contender(env, tmp_path / "home-b", fingerprint, tmp_path, "B", train_seconds=4, after="A.locked")
    try:
        assert a.wait(120) == 0, a.stderr()
        assert b.wait(120) == 0, b.stderr()
    finally:
        a.kill()
        b.kill()
    seen = events(tmp_path)
    assert [e for e, _ in seen["A"]] == ["locked", "train-start", "train-end"]
    assert [e for e, _ in seen["B"]] == ["locked", "cached-after-lock"]  # it waited, then found the result
    assert when(tmp_path, "B", "locked") >= when(tmp_path, "A", "train-end")
    assert "being computed by another run (concurrency limit" in b.stderr()
    # Different homes, different file locks: only the server kept them apart.
    assert (tmp_path / "home-a/locks" / f"{fingerprint}.lock").exists()
    assert (tmp_path / "home-b/locks" / f"{fingerprint}.lock").exists()
    assert lock_is_held(fingerprint) is False  # released on exit


@pytest.mark.e2e
def test_a_killed_holder_is_freed_when_its_lease_runs_out(api, tmp_path):
    """Two homes (two machines): the holder is SIGKILLed; the waiter gets the fingerprint once the
    holder's lease has run out and the repossessor has freed the slot, not before."""
    fingerprint = "b2" * 32
    env = client_env(api)
    a = Contender(env, tmp_path / "home-a", fingerprint, tmp_path, "A", train_seconds=600)
    b = Contender(env, tmp_path / "home-b", fingerprint, tmp_path, "B", train_seconds=1, after="A.locked")
    try:
        wait_for(lambda: when(tmp_path, "A", "locked") is not None, 120, "A to take the lock")
        wait_for(lambda: "being computed by another run" in b.stderr(), 60, "B to wait")
        a.kill()
        killed = time.time()
        assert lock_is_held(fingerprint) is True  # a dead holder holds until its lease runs out
        assert b.wait(LEASE + 60) == 0, b.stderr()
    finally:
        a.kill()
        b.kill()
    acquired = when(tmp_path, "B", "locked")
    print(f"B took the lock {acquired - killed:.1f} s after A was killed")
    assert [e for e, _ in events(tmp_path)["B"]] == ["locked", "train-start", "train-end"]
    assert acquired >= when(tmp_path, "A", "locked") + LEASE - 1  # not before A's lease ran out
    assert acquired - killed <= LEASE + 15
    assert lock_is_held(fingerprint) is False


@pytest.mark.e2e
def test_a_rerun_in_the_home_of_a_killed_holder_does_not_wait_for_its_lease(api, tmp_path):
    """Same home: the file lock proves the recorded holder dead, so its lease is released at once."""
    fingerprint = "f6" * 32
    env = client_env(api)
    home = tmp_path / "home"
    a = Contender(env, home, fingerprint, tmp_path, "A", train_seconds=600)
    try:
        wait_for(lambda: when(tmp_path, "A", "locked") is not None, 120, "A to take the lock")
        assert (home / "locks" / f"{fingerprint}.lease").exists()
    finally:
        a.kill()
    killed = time.time()
    assert lock_is_held(fingerprint) is True
    b = Contender(env, home, fingerprint, tmp_path, "B", train_seconds=1)
    try:
        assert b.wait(LEASE - 10) == 0, b.stderr()  # well before A's lease could run out
    finally:
        b.kill()
    print(f"rerun took the lock {when(tmp_path, 'B', 'locked') - killed:.1f} s after the kill")
    assert [e for e, _ in events(tmp_path)["B"]] == ["locked", "train-start", "train-end"]
    assert "releasing the fingerprint lock of a run of this home that died" in b.stderr()
    assert not (home / "locks" / f"{fingerprint}.lease").exists()
    assert lock_is_held(fingerprint) is False


@pytest.mark.e2e
def test_a_server_restart_during_a_renewal_neither_stops_training_nor_frees_the_slot(server, tmp_path):
    """Two homes; the module's server is stopped while the holder trains, so that a renewal falls due
    while it is down (the shortest lease, 60 s, renewed every 2 s), and is started again. The holder
    keeps training, renews once the server is back and so keeps the slot past the lease it held when
    the server went down (it trains until then, and the waiter is checked to be still waiting); the
    waiter rides the outage out. The slot is released at the end, which needs the lease to have
    survived the restart (releasing a lease the server does not know frees nothing), and only then
    does the waiter get in. The server may take up to about 53 s to come back (lease - renewal interval
    - retry interval)."""
    lease, renew = LEASE, 2
    fingerprint = "a7" * 32
    env = {**client_env(server, lease=lease), RENEW_SECONDS_ENV: str(renew)}
    a = Contender(env, tmp_path / "home-a", fingerprint, tmp_path, "A", train_seconds=600)
    b = Contender(env, tmp_path / "home-b", fingerprint, tmp_path, "B", train_seconds=1, after="A.locked")
    try:
        wait_for(lambda: when(tmp_path, "A", "locked") is not None, 120, "A to take the lock")
        wait_for(lambda: "being computed by another run" in b.stderr(), 60, "B to wait")
        server.stop()
        down = time.time()  # every lease A held before this ends by down + lease unless renewed later
        wait_for(lambda: "could not renew the fingerprint lock" in a.stderr(), 30, "a failed renewal")
        server.start()
        print(f"server down {time.time() - down:.1f} s (restart {server.startup_seconds:.1f} s)")
        wait_for(lambda: "fingerprint lock renewed again" in a.stderr(), 30, "a renewal after the restart")
        time.sleep(max(0.0, down + lease + 3 - time.time()))  # + the repossessor's 1 s loop, with room
        assert when(tmp_path, "B", "locked") is None, "the slot was given away while its holder trained"
        (tmp_path / "A.stop").touch()
        assert a.wait(60) == 0, a.stderr()
        assert b.wait(60) == 0, b.stderr()
    finally:
        a.kill()
        b.kill()
    assert "expired" not in a.stderr()
    assert [e for e, _ in events(tmp_path)["A"]] == ["locked", "train-start", "train-end"]
    assert [e for e, _ in events(tmp_path)["B"]] == ["locked", "cached-after-lock"]
    assert when(tmp_path, "A", "train-end") >= down + lease  # it held the slot past that lease
    assert when(tmp_path, "B", "locked") >= when(tmp_path, "A", "train-end")


@pytest.mark.e2e
def test_without_a_server_the_file_lock_serializes_one_home(api, tmp_path):
    fingerprint = "c3" * 32
    env = client_env(None)  # no PREFECT_API_URL: the file lock only
    home = tmp_path / "home"
    a = Contender(env, home, fingerprint, tmp_path, "A", train_seconds=3)
    b = Contender(env, home, fingerprint, tmp_path, "B", train_seconds=3, after="A.locked")
    try:
        assert a.wait(120) == 0, a.stderr()
        assert b.wait(120) == 0, b.stderr()
    finally:
        a.kill()
        b.kill()
    assert [e for e, _ in events(tmp_path)["B"]] == ["locked", "cached-after-lock"]
    assert when(tmp_path, "B", "locked") >= when(tmp_path, "A", "train-end")
    assert "being computed by another run on this host" in b.stderr()
    assert lock_is_held(fingerprint) is False  # no limit was ever created on the server


@pytest.mark.e2e
def test_creating_the_limit_concurrently_succeeds_everywhere(api):
    name = limit_name("d4" * 32)
    errors: list[BaseException] = []

    def create():
        try:
            ensure_limit(name)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    # Each thread runs in a copy of this context: the API URL is a context setting (``api``).
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(create,)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    from prefect import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    assert (limit.limit, limit.active_slots, limit.active) == (1, 0, True)


def test_lock_state_is_unknown_without_a_server(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # also when an earlier test left a session-wide temporary server configured (prefect_api_url)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert lock_is_held("e5" * 32) is None


@pytest.mark.parametrize("value", ["30", "abc", "100000"])
def test_a_lease_the_server_would_refuse_is_a_user_error(monkeypatch, value):
    monkeypatch.setenv(LEASE_SECONDS_ENV, value)
    with pytest.raises(UserError, match=LEASE_SECONDS_ENV):
        lease_seconds()


@pytest.mark.parametrize("value", ["0", "abc", "61"])
def test_a_renewal_interval_not_well_inside_the_lease_is_a_user_error(monkeypatch, value):
    monkeypatch.setenv(RENEW_SECONDS_ENV, value)
    with pytest.raises(UserError, match=RENEW_SECONDS_ENV):
        renew_seconds(70.0)


def test_renewals_come_every_half_lease_unless_set(monkeypatch):
    monkeypatch.delenv(RENEW_SECONDS_ENV, raising=False)
    assert renew_seconds(300.0) == 150.0
    monkeypatch.setenv(RENEW_SECONDS_ENV, "10")
    assert renew_seconds(70.0) == 10.0


class FlakyClient:
    """Stands in for Prefect's client in the renewal thread: ``outcomes`` says what each renewal does."""

    def __init__(self, outcomes):
        self.outcomes, self.calls = list(outcomes), 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def renew_concurrency_lease(self, lease_id, lease_duration):
        self.calls += 1
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if isinstance(outcome, BaseException):
            raise outcome


def _gone() -> Exception:
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    request = httpx.Request("POST", "http://server/api/v2/concurrency_limits/leases/x/renew")
    return PrefectHTTPStatusError("gone", request=request, response=httpx.Response(410, request=request))


def _renew_in_thread(monkeypatch, outcomes, run_for):
    import uuid

    from runtime import fingerprint_lock

    client = FlakyClient(outcomes)
    monkeypatch.setattr(fingerprint_lock, "get_client", lambda sync_client: client)
    monkeypatch.setattr(fingerprint_lock, "RENEW_RETRY_SECONDS", 0.02)
    stop = threading.Event()
    args = (stop, uuid.uuid4(), 0.1, "sft")  # renew every 0.05 s
    thread = threading.Thread(target=fingerprint_lock._renew_until, args=args)
    thread.start()
    time.sleep(run_for)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    return client


def test_failed_renewals_are_retried_and_never_end_the_stage(monkeypatch, caplog):
    blips = [ConnectionError("server down")] * 5
    with caplog.at_level("INFO", logger="rlhf"):
        client = _renew_in_thread(monkeypatch, blips, run_for=0.6)
    assert client.calls > len(blips)  # it kept renewing after the blip
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "could not renew the fingerprint lock" in warnings[0]  # once per outage
    assert any("renewed again" in r.getMessage() for r in caplog.records)


def test_a_lease_already_given_back_stops_renewing_with_a_warning(monkeypatch, caplog):
    with caplog.at_level("INFO", logger="rlhf"):
        client = _renew_in_thread(monkeypatch, [_gone()], run_for=0.3)
    assert client.calls == 1
    assert any("another run may start the same stage" in r.getMessage() for r in caplog.records)
