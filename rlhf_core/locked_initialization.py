"""Run a one-time initialisation (a database's schema) once, however many processes start at once."""

from __future__ import annotations

import fcntl
from collections.abc import Callable
from pathlib import Path


def initialize_once(target: Path, create: Callable[[], str]) -> None:
    """Call ``create`` unless ``target`` is already initialised, one process at a time.

    ``<target>.lock`` serialises processes (the OS releases it if one dies); ``<target>.ready``, holding
    what ``create`` returns, records the initialisation, so later calls return at once.
    """
    ready = target.with_name(target.name + ".ready")
    if ready.exists() and target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if ready.exists() and target.exists():
            return
        ready.write_text(create())
