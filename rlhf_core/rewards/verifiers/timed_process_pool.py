"""A long-lived pool of spawned worker processes that runs one call per task under a deadline.

Verifiers that parse model output with sympy (``math_answer``) can meet inputs that make a parser
run for minutes. math-verify guards itself with ``signal.alarm``, which only works in a process's main
thread; a trainer calls rewards from wherever it likes (a worker thread, a process that already
started torch's threads). So the work runs here instead, in worker processes of the "spawn" start
method (fork-safe after torch), each doing one task at a time in its own main thread:

- in the worker, an interval timer (``signal.setitimer``) interrupts a task that overruns
  ``timeout_s``; the task reports ``timeout`` and the worker lives on;
- in the parent, a backstop: a task still unanswered ``grace_s`` after its deadline (a C routine that
  never returns to the interpreter, so the timer's handler cannot run) gets its worker killed and
  replaced; the task reports ``timeout`` too;
- a task that raises reports ``error``; a worker that dies mid-task is replaced, its task ``error``.

Pools are created lazily by :func:`shared_pool`, reused across batches and closed at interpreter
exit (``atexit``), so no process outlives the program. As with any spawned pool (torch's DataLoader
workers too), a spawned worker re-imports the program's ``__main__`` script: a script that scores at
top level must keep that code under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Literal

START_TIMEOUT_S = 120.0  # a spawned worker imports sympy before it is ready; slow on a loaded machine


@dataclass(frozen=True)
class TaskOutcome:
    """What one task came to: its return value (``ok``), ``timeout``, or ``error`` with a message."""

    status: Literal["ok", "timeout", "error"]
    value: Any = None
    error: str = ""


class _TaskTimeout(BaseException):
    """Raised by the worker's timer; a BaseException so parsers' ``except Exception`` cannot swallow it."""


def _on_alarm(signum, frame) -> None:
    raise _TaskTimeout


def _worker_main(connection: Connection, preload: tuple[str, ...]) -> None:
    """Worker loop: import ``preload``, say ready, then run (function, args, timeout_s) until None."""
    for module in preload:
        __import__(module)
    signal.signal(signal.SIGALRM, _on_alarm)
    connection.send(("ready", None))
    while (task := connection.recv()) is not None:
        function, arguments, timeout_s = task
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            reply = ("ok", function(*arguments))
        except _TaskTimeout:
            reply = ("timeout", None)
        except Exception as error:  # the task's failure is its outcome, the worker lives on
            reply = ("error", f"{type(error).__name__}: {error}"[:500])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        connection.send(reply)


class _Worker:
    """One spawned process, its end of the pipe, and the task it is running (index, deadline)."""

    def __init__(self, context, preload: tuple[str, ...]) -> None:
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child_end, preload), daemon=True)
        self.process.start()
        child_end.close()
        self.ready = False
        self.task: int | None = None
        self.deadline = time.monotonic() + START_TIMEOUT_S

    def stop(self, kill: bool) -> None:
        if not kill and self.process.is_alive():
            try:
                self.connection.send(None)
                self.process.join(timeout=2.0)
            except (OSError, EOFError):
                pass
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5.0)
        self.connection.close()


class TimedProcessPool:
    """``workers`` spawned processes running picklable top-level functions with a per-task timeout.

    ``map`` is thread-safe: concurrent batches take turns. ``preload`` names modules each worker imports
    before it says ready, so the import cost is paid once per worker, not inside a task's deadline.
    """

    def __init__(self, workers: int, preload: Sequence[str] = ()) -> None:
        if workers < 1:
            raise ValueError(f"a pool needs at least one worker, got {workers}")
        self.workers = workers
        self._preload = tuple(preload)
        self._context = multiprocessing.get_context("spawn")
        self._pool: list[_Worker] = []
        self._lock = threading.Lock()
        self.started_workers = 0  # how many processes this pool has spawned (replacements included)

    def map(
        self, function: Callable, calls: Sequence[tuple], timeout_s: float, grace_s: float = 2.0
    ) -> list[TaskOutcome]:
        """``function(*call)`` for each call, in order; each gets ``timeout_s`` in its worker."""
        with self._lock:
            for worker in [w for w in self._pool if not w.process.is_alive()]:
                self._replace(worker)  # died between batches (killed from outside)
            while len(self._pool) < self.workers:
                self._spawn()
            return _Batch(self, function, calls, timeout_s, grace_s).run()

    def close(self) -> None:
        """Stop every worker (politely, then by kill); the pool respawns them if used again."""
        with self._lock:
            for worker in self._pool:
                worker.stop(kill=False)
            self._pool.clear()

    def _spawn(self) -> _Worker:
        worker = _Worker(self._context, self._preload)
        self._pool.append(worker)
        self.started_workers += 1
        return worker

    def _replace(self, worker: _Worker) -> None:
        self._pool.remove(worker)
        worker.stop(kill=True)
        self._spawn()


class _Batch:
    """One ``map`` call: hand tasks to idle workers, collect replies, enforce the deadlines."""

    def __init__(self, pool: TimedProcessPool, function, calls, timeout_s: float, grace_s: float) -> None:
        self.pool, self.function, self.calls = pool, function, list(calls)
        self.timeout_s, self.grace_s = timeout_s, grace_s
        self.pending = deque(range(len(self.calls)))
        self.outcomes: list[TaskOutcome | None] = [None] * len(self.calls)

    def run(self) -> list[TaskOutcome]:
        while self.pending or any(worker.task is not None for worker in self.pool._pool):
            self._hand_out()
            now = time.monotonic()
            waiting = [w for w in self.pool._pool if w.task is not None or not w.ready]
            next_deadline = min(w.deadline for w in waiting)
            for connection in wait([w.connection for w in waiting], timeout=max(0.0, next_deadline - now)):
                self._receive(next(w for w in self.pool._pool if w.connection is connection))
            self._enforce_deadlines()
        return [outcome for outcome in self.outcomes if outcome is not None]

    def _hand_out(self) -> None:
        for worker in list(self.pool._pool):
            if worker.ready and worker.task is None and self.pending:
                worker.task = self.pending.popleft()
                worker.deadline = time.monotonic() + self.timeout_s + self.grace_s
                try:
                    worker.connection.send((self.function, self.calls[worker.task], self.timeout_s))
                except OSError:  # the worker is gone: its task goes back in line
                    self.pending.appendleft(worker.task)
                    self.pool._replace(worker)

    def _receive(self, worker: _Worker) -> None:
        try:
            status, value = worker.connection.recv()
        except (EOFError, OSError):  # the worker died (a crash in C code, killed for memory)
            if worker.task is None:
                raise RuntimeError(
                    "a verifier worker process exited while starting (see its traceback above); a script "
                    "that scores at top level needs the `if __name__ == '__main__':` guard of spawned pools"
                ) from None
            self._finish(worker, TaskOutcome("error", error="the worker process exited during the task"))
            self.pool._replace(worker)
            return
        if status == "ready":
            worker.ready, worker.deadline = True, float("inf")
        else:
            self._finish(worker, TaskOutcome(status, value if status == "ok" else None, value or ""))
            worker.deadline = float("inf")

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self.pool._pool):
            if worker.deadline > now:
                continue
            if worker.task is None:
                raise RuntimeError(f"a verifier worker process did not start within {START_TIMEOUT_S:.0f} s")
            self._finish(worker, TaskOutcome("timeout"))  # past the timer and the grace: stuck in C code
            self.pool._replace(worker)

    def _finish(self, worker: _Worker, outcome: TaskOutcome) -> None:
        self.outcomes[worker.task] = outcome
        worker.task = None


_SHARED: dict[str, TimedProcessPool] = {}
_SHARED_LOCK = threading.Lock()


def default_worker_count() -> int:
    """One worker per CPU this process may use, at most 8 (parsing is short; more would sit idle)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, usable))


def shared_pool(name: str, preload: Sequence[str] = (), workers: int | None = None) -> TimedProcessPool:
    """The process-wide pool called ``name``, created on first use and closed at interpreter exit."""
    with _SHARED_LOCK:
        if name not in _SHARED:
            _SHARED[name] = TimedProcessPool(workers or default_worker_count(), preload)
        return _SHARED[name]


@atexit.register
def _close_shared_pools() -> None:
    for pool in _SHARED.values():
        pool.close()
