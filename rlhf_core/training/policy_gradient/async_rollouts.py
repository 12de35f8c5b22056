"""Asynchronous rollouts: a background thread generates the next rounds of completions while the trainer
trains on the current one, at most ``max_staleness`` rounds ahead (AReaL / prime-rl style).

Why: with synchronous rollouts the trainer waits for every generation and the engine waits for every
update. Letting generation run ahead overlaps the two, at a price: a round may be sampled by weights a
few updates old (pi_behaviour != pi_old), so the trainer corrects it off-policy (book ch.6): each token
is weighted by min(pi_old / pi_behaviour, C), with pi_behaviour the log-probs the engine returns with
the tokens. The bound K on how far generation runs ahead keeps that ratio near 1.

Vocabulary:

- a *round* j is one engine call for the prompts the trainer's ``plan(j)`` names (a pure function of
  j, so a resumed run asks for the same rounds); the trainer takes rounds in order 0, 1, 2, ... (a
  rollout may take several: refills);
- a *version* v is what the trainer publishes with a weights snapshot: the index of the rollout whose
  updates start from those weights.

The gate, the staleness bound by construction: round j starts only once some version is published and
``j - K <= the highest round the trainer has asked for`` (K = 0: lockstep, exactly synchronous rollouts;
K = 1: one round ahead). Before each round the thread applies the newest published snapshot with
``engine.sync_weights``, never during a generate; older unapplied snapshots are dropped.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_core.errors import UserError
from rlhf_core.rollout.engines.base import EngineError, EngineOutput, RolloutEngine, SamplingRequest


@dataclass(frozen=True)
class RoundRequest:
    """What round j asks the engine for: ``n`` samples of each prompt with these settings and seed."""

    prompt_ids: list[list[int]]
    n: int
    request: SamplingRequest
    seed: int


@dataclass(frozen=True)
class GeneratedRound:
    """Round ``round``'s completions, the version of the weights that sampled them, and how long the
    trainer waited for them in :meth:`AsyncRolloutProducer.take`."""

    round: int
    output: EngineOutput
    version: int
    wait_s: float


def is_stale(version: int, consumer_version: int, max_staleness: int) -> bool:
    """True when weights of ``version`` are more than ``max_staleness`` versions older than the
    consumer's (the gate rules it out when rollout i takes round i after publishing version i)."""
    return consumer_version - version > max_staleness


def staleness_counts(versions: list[int], consumer_version: int) -> dict[int, int]:
    """How many rounds (of those sampled by ``versions``) are 0, 1, 2, ... versions behind the consumer."""
    return dict(sorted(Counter(consumer_version - v for v in versions).items()))


class AsyncRolloutProducer:
    """Generates rounds ``first_round, first_round + 1, ...`` with ``engine`` in a background thread.

    The trainer calls :meth:`publish` with each new weights snapshot and :meth:`take` for each round, in
    order. The engine is used by the thread only (the caller must not call it while the producer runs)
    and is never closed here. ``what`` names the stage in errors.
    """

    def __init__(
        self,
        engine: RolloutEngine,
        plan: Callable[[int], RoundRequest],
        *,
        max_staleness: int,
        first_round: int = 0,
        what: str,
        join_timeout_s: float = 10.0,
    ) -> None:
        if max_staleness < 0:
            raise UserError(f"{what}: max_staleness must be 0 or more (rounds ahead), got {max_staleness}")
        self.engine, self.plan, self.what = engine, plan, what
        self.max_staleness, self.join_timeout_s = max_staleness, join_timeout_s
        self.engine_busy_s = 0.0  # seconds in engine.generate and engine.sync_weights
        self.engine_idle_s = 0.0  # seconds the thread waited for the gate or a first version
        self.syncs = 0  # snapshots applied to the engine
        self._state = threading.Condition()
        self._pending: tuple[int, Any] | None = None  # the newest published snapshot not yet applied
        self._applied: int | None = None  # the version the engine holds
        self._asked = first_round - 1  # the highest round passed to take
        self._taken = first_round - 1
        self._next = first_round  # the next round the thread generates
        self._done: dict[int, tuple[EngineOutput, int]] = {}
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"rollouts {what}", daemon=True)

    # --- life cycle ----------------------------------------------------------------------------------

    def __enter__(self) -> AsyncRolloutProducer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the thread: it starts no new round; a generate in flight may finish, but this waits at
        most ``join_timeout_s`` for it (the thread is a daemon and drops its result)."""
        with self._state:
            self._closed = True
            self._state.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=self.join_timeout_s)

    # --- the trainer's side --------------------------------------------------------------------------

    def publish(self, version: int, weights: Any) -> None:
        """Make ``weights`` (a snapshot the caller will not modify) the ones of the next round to start;
        a snapshot published before it and not yet applied is dropped."""
        with self._state:
            self._pending = (version, weights)
            self._state.notify_all()

    def take(self, j: int, timeout_s: float | None = None) -> GeneratedRound:
        """Round ``j`` (the one after the last taken), waiting for it if needed. Re-raises the
        engine's exception if the thread failed before generating it; EngineError after ``timeout_s``."""
        if j != self._taken + 1:
            raise ValueError(f"rounds are taken in order: expected round {self._taken + 1}, got {j}")
        started = time.monotonic()
        deadline = None if timeout_s is None else started + timeout_s
        with self._state:
            self._asked = max(self._asked, j)
            self._state.notify_all()
            while j not in self._done and self._error is None and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise EngineError(f"{self.what}: rollout round {j} was not generated in {timeout_s} s")
                self._state.wait(left)
            if j not in self._done:
                if self._error is not None:
                    raise self._error
                raise EngineError(f"{self.what}: the rollout producer was closed before round {j}")
            output, version = self._done.pop(j)
            self._taken = j
        return GeneratedRound(j, output, version, time.monotonic() - started)

    # --- the thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (work := self._next_work()) is not None:
                j, snapshot = work
                started = time.monotonic()
                if snapshot is not None:
                    self.engine.sync_weights(snapshot[1])
                    self._applied = snapshot[0]
                    self.syncs += 1
                wanted = self.plan(j)
                output = self.engine.generate(wanted.prompt_ids, wanted.n, wanted.request, wanted.seed)
                with self._state:
                    self.engine_busy_s += time.monotonic() - started
                    assert self._applied is not None
                    self._done[j] = (output, self._applied)
                    self._next = j + 1
                    self._state.notify_all()
        except BaseException as error:  # the trainer's next take raises it, unchanged
            with self._state:
                self._error = error
                self._state.notify_all()

    def _next_work(self) -> tuple[int, tuple[int, Any] | None] | None:
        """Wait at the gate; then (the round to generate, the snapshot to apply first or None), or None
        once closed."""
        started = time.monotonic()
        with self._state:
            while not self._closed and not self._gate_open():
                self._state.wait()
            self.engine_idle_s += time.monotonic() - started
            if self._closed:
                return None
            snapshot, self._pending = self._pending, None
            return self._next, snapshot

    def _gate_open(self) -> bool:
        has_version = self._pending is not None or self._applied is not None
        return has_version and self._next - self.max_staleness <= self._asked
