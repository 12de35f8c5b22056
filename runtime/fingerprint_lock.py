"""One computation per fingerprint, on one host and across machines.

Two runs given the same stage (same fingerprint) must not both train it: the second waits, then
finds the first one's result in the cache (``runtime.stage_execution``). ``fingerprint_lock`` takes two
locks, always in this order, so no two runs can wait on each other:

1. A file lock ``<home>/locks/<fingerprint>.lock`` (``fcntl``; the OS frees it when its process dies).
   It serializes the runs of one home on one host, and needs no server.
2. When Prefect talks to an API server (``PREFECT_API_URL`` is set), the one slot of a global
   concurrency limit named ``rlhf-fingerprint-<first 40 hex digits>`` on that server: the lock every
   worker sees. The limit is created on first use (a second creator finds it there); the slot is then
   taken strictly (a missing limit is an error, never "run unlocked") under a lease.

The lease lasts ``RLHF_LOCK_LEASE_SECONDS`` (default 300; the server accepts 60 to 86400) and is
renewed by a thread while the stage runs, every ``RLHF_LOCK_RENEW_SECONDS`` (default: half the lease;
at most the lease minus 10 s, so a renewal never falls due after its lease). A failed renewal is
logged and retried every few seconds, never ending the stage: a server blip must not kill a run of
several hours. Only an outage longer than the rest of the lease lets the lease lapse; the stage still
goes on, and another run may then start the same fingerprint (a duplicate training, not a wrong
result).

A holder that dies (SIGKILL, lost node) keeps its slot until its lease runs out and the server's
repossessor service frees it (a pass every 15 s): a dead holder blocks the fingerprint for at most
about one lease. A run of the same home does better: the lease id is kept beside the file lock
(``<fingerprint>.lease``), and whoever gets the file lock next knows its writer is dead and
releases that lease at once (a rerun after a crash on one machine does not wait).

The repossessor runs only in a real ``prefect server start`` (not in the ephemeral server a run
starts on its own, nor in ``prefect_test_harness``), and the server must keep leases where a restart
does not lose them: ``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=
prefect.server.concurrency.lease_storage.filesystem`` (the default keeps them in memory: after a
restart their slots are never freed).

Limits are left on the server after use, not deleted: deleting one on release races with a waiter
that has just been granted its slot (a third run would create a fresh limit and run beside it). A
limit is one small row; ``prefect global-concurrency-limit ls`` lists them, and
``prefect global-concurrency-limit delete rlhf-fingerprint-...`` removes one no run is using.
"""

from __future__ import annotations

import contextvars
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from uuid import UUID

from prefect import get_client, get_run_logger
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import (
    MissingContextError,
    ObjectAlreadyExists,
    ObjectNotFound,
    PrefectHTTPStatusError,
)
from prefect.settings import get_current_settings

from rlhf_core.errors import UserError
from rlhf_core.settings import RLHFSettings

LEASE_SECONDS_ENV = "RLHF_LOCK_LEASE_SECONDS"
RENEW_SECONDS_ENV = "RLHF_LOCK_RENEW_SECONDS"
DEFAULT_LEASE_SECONDS = 300.0
MIN_LEASE_SECONDS, MAX_LEASE_SECONDS = 60.0, 86400.0  # what the server accepts
LIMIT_PREFIX = "rlhf-fingerprint-"
HTTP_LOCKED = 423  # the server's answer while another lease holds the slot
HTTP_GONE = 410  # a renewal too late: the lease expired and its slot was given back
MAX_POLL_SECONDS = 30.0  # a waiter asks again at least this often (the server suggests when)
RENEW_RETRY_SECONDS = 5.0


@contextmanager
def fingerprint_lock(settings: RLHFSettings, fingerprint: str, stage: str) -> Iterator[None]:
    """Hold the lock on ``fingerprint`` for the block: the file lock, then the server's limit when there
    is an API server (see the module docstring). Waits, logging once, while another run holds it."""
    with file_lock(settings.lock_dir(), fingerprint, stage):
        if api_url() is None:
            yield
        else:
            with server_lock(settings.lock_dir(), fingerprint, stage):
                yield


def api_url() -> str | None:
    """The Prefect API server's URL, or None when runs start their own ephemeral server."""
    return get_current_settings().api.url or None


def limit_name(fingerprint: str) -> str:
    return LIMIT_PREFIX + fingerprint[:40]


def lease_seconds() -> float:
    """The lease of a held slot, from ``RLHF_LOCK_LEASE_SECONDS``; the server accepts 60 s to one day."""
    text = os.environ.get(LEASE_SECONDS_ENV, str(DEFAULT_LEASE_SECONDS))
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not MIN_LEASE_SECONDS <= seconds <= MAX_LEASE_SECONDS:
        raise UserError(
            f"{LEASE_SECONDS_ENV}={text!r}: expected seconds between {MIN_LEASE_SECONDS:.0f} and "
            f"{MAX_LEASE_SECONDS:.0f} (the Prefect server's bounds on a lease)"
        )
    return seconds


def renew_seconds(lease: float) -> float:
    """How often a held lease is renewed, from ``RLHF_LOCK_RENEW_SECONDS``; default half the lease.

    A shorter interval than the default only costs a request; tests use it to reach a renewal soon."""
    text = os.environ.get(RENEW_SECONDS_ENV)
    if text is None:
        return lease / 2
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 1.0 <= seconds <= lease - 10:
        raise UserError(
            f"{RENEW_SECONDS_ENV}={text!r}: expected seconds between 1 and {lease - 10:.0f} (10 s less "
            f"than the lease, {LEASE_SECONDS_ENV}={lease:.0f}, so each renewal comes before its lease ends)"
        )
    return seconds


@contextmanager
def file_lock(lock_dir: Path, fingerprint: str, stage: str) -> Iterator[None]:
    """Exclusive lock on ``fingerprint`` among the processes of one host and home (freed by the OS when
    its process dies)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{fingerprint}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _logger().info(
                "stage %s: fingerprint %s is being computed by another run on this host; waiting",
                stage,
                fingerprint[:12],
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def server_lock(lock_dir: Path, fingerprint: str, stage: str) -> Iterator[None]:
    """The one slot of the fingerprint's global concurrency limit, under a lease renewed in a thread.

    Called with the file lock held: a lease recorded in ``<fingerprint>.lease`` beside it belongs to a
    run of this home that died holding it, and is released at once instead of after its expiry."""
    name, seconds = limit_name(fingerprint), lease_seconds()
    every = renew_seconds(seconds)
    record = lock_dir / f"{fingerprint}.lease"
    ensure_limit(name)
    _release_dead_lease(record, stage)
    lease_id = _take_slot(name, seconds, stage, fingerprint)
    record.write_text(str(lease_id))
    stop = threading.Event()
    renewer = threading.Thread(
        target=contextvars.copy_context().run,
        args=(_renew_until, stop, lease_id, seconds, stage, every),
        name=f"rlhf-lease-{fingerprint[:12]}",
        daemon=True,
    )
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join(timeout=10)
        _release(lease_id, stage)
        record.unlink(missing_ok=True)


def ensure_limit(name: str) -> None:
    """Create the limit (one slot) unless it exists; two processes creating it at once both succeed.

    Read first: a refused duplicate costs the server an error traceback in its log."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # created by another run in between
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


def _take_slot(name: str, seconds: float, stage: str, fingerprint: str) -> UUID:
    """Wait for the limit's slot; the id of the lease that holds it. Strict: a limit that has gone
    missing is an error, never a run without the lock."""
    told = False
    with get_client(sync_client=True) as client:
        while True:
            try:
                response = client.increment_concurrency_slots_with_lease(
                    names=[name], slots=1, mode="concurrency", lease_duration=seconds, holder=_holder()
                )
            except PrefectHTTPStatusError as exc:
                if exc.response.status_code != HTTP_LOCKED:
                    raise
                if not told:
                    _logger().info(
                        "stage %s: fingerprint %s is being computed by another run (concurrency limit %s "
                        "on the Prefect server); waiting",
                        stage,
                        fingerprint[:12],
                        name,
                    )
                    told = True
                time.sleep(min(float(exc.response.headers.get("Retry-After", 5)), MAX_POLL_SECONDS))
                continue
            granted = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
            if not granted.limits:
                raise RuntimeError(f"the concurrency limit {name} vanished from the Prefect server")
            return granted.lease_id


def _renew_until(
    stop: threading.Event, lease_id: UUID, seconds: float, stage: str, every: float | None = None
) -> None:
    """Renew every ``every`` seconds (default half the lease) until ``stop``; after a failure retry
    every few seconds, forever: a server blip must neither end the stage nor give the slot away while
    the stage still runs.

    A fresh client per renewal: a client that has connected once retries a refused connection for about
    a minute on its own, which could let a short lease lapse before this loop tries again."""
    failing = False
    every = seconds / 2 if every is None else every
    while not stop.wait(RENEW_RETRY_SECONDS if failing else every):
        try:
            with get_client(sync_client=True) as client:
                client.renew_concurrency_lease(lease_id=lease_id, lease_duration=seconds)
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code == HTTP_GONE:
                _logger().warning(
                    "stage %s: its lease on the fingerprint lock expired (the Prefect server was out "
                    "of reach for longer than %.0f s); training goes on, but another run may start "
                    "the same stage",
                    stage,
                    seconds,
                )
                return
            failing = _renewal_failed(stage, exc, failing)
        except Exception as exc:  # noqa: BLE001 - network trouble: keep trying, keep training
            failing = _renewal_failed(stage, exc, failing)
        else:
            if failing:
                _logger().info("stage %s: fingerprint lock renewed again", stage)
            failing = False


def _renewal_failed(stage: str, exc: Exception, failing: bool) -> bool:
    if not failing:
        _logger().warning("stage %s: could not renew the fingerprint lock (%s); retrying", stage, exc)
    return True


def _release(lease_id: UUID, stage: str) -> None:
    try:
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(lease_id=lease_id)
    except Exception as exc:  # noqa: BLE001 - the lease then frees the slot when it runs out
        _logger().warning(
            "stage %s: could not release the fingerprint lock (%s); the server frees it within %.0f s",
            stage,
            exc,
            lease_seconds(),
        )


def _release_dead_lease(record: Path, stage: str) -> None:
    """Release the lease a dead run of this home left in ``record`` (unknown or expired leases are a
    no-op on the server)."""
    try:
        lease_id = UUID(record.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    _logger().info("stage %s: releasing the fingerprint lock of a run of this home that died", stage)
    _release(lease_id, stage)
    record.unlink(missing_ok=True)


def _holder() -> ConcurrencyLeaseHolder | None:
    """The task or flow run holding the lease (shown with the limit on the server), when there is one."""
    if (task_run := TaskRunContext.get()) is not None:
        return ConcurrencyLeaseHolder(type="task_run", id=task_run.task_run.id)
    if (flow_run := FlowRunContext.get()) is not None and flow_run.flow_run is not None:
        return ConcurrencyLeaseHolder(type="flow_run", id=flow_run.flow_run.id)
    return None


def lock_is_held(fingerprint: str) -> bool | None:
    """Whether some run holds ``fingerprint``'s slot on the Prefect server; None when it cannot tell (no
    API server, or the server did not answer). A killed holder still counts as holding until its lease
    runs out and the repossessor frees the slot."""
    if api_url() is None:
        return None
    try:
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(limit_name(fingerprint))
    except ObjectNotFound:
        return False
    except Exception as exc:  # noqa: BLE001 - "cannot tell" is the answer for any failure
        _logger().debug("could not read the lock of fingerprint %s: %s", fingerprint[:12], exc)
        return None
    return limit.active_slots > 0


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("rlhf")
