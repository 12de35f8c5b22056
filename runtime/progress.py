"""Stage progress events, for whoever shows a pipeline as it runs (the terminal's live view).

The stage life cycle (``runtime.stage_execution``) publishes one event when a stage starts, one per
logged training step that carries the progress metric, and one when it ends (ran, resumed, cached or
failed). Listeners subscribe for the duration of a run; with none subscribed publishing costs nothing.
A listener that raises is dropped from that event and never fails the stage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

STARTED, STEP, FINISHED, FAILED = "started", "step", "finished", "failed"
DETAIL = "detail"  # metrics logged between progress steps (e.g. a rollout's), the stage still running


@dataclass(frozen=True)
class StageEvent:
    """What happened to a stage.

    ``status``: 'running', 'resuming', 'ran', 'resumed', 'cached' or 'failed'.
    """

    stage: str
    kind: str
    event: str
    status: str
    step: int | None = None
    total: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""
    time: float = field(default_factory=time.monotonic)


Listener = Callable[[StageEvent], None]
_listeners: list[Listener] = []
_lock = threading.Lock()


@contextmanager
def subscribed(listener: Listener) -> Iterator[None]:
    """Call ``listener`` with every stage event published while the block runs."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)


def has_listeners() -> bool:
    return bool(_listeners)


def publish(event: StageEvent) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(event)
        except Exception as exc:  # a display problem must never stop a stage
            logging.getLogger("rlhf").warning("progress listener failed on %s: %s", event.stage, exc)
