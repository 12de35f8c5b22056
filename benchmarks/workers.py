"""Contenders run in fresh subprocesses: the worker prints one result line, the driver reads it back
and redoes a run that other processes disturbed (keeping the disturbed one aside as discarded)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from typing import Any, TypeVar

from machine_load import wait_for_quiet

RESULT_PREFIX = "RESULT "
R = TypeVar("R")


def emit_result(result: Any) -> None:
    """In a worker: print the result (a dataclass or a dict) as the line the driver looks for."""
    payload = asdict(result) if is_dataclass(result) else result
    print(RESULT_PREFIX + json.dumps(payload), flush=True)


def run_worker(script: str, label: str, flags: dict[str, str]) -> dict:
    """Run ``script`` with ``flags`` in a fresh Python process; the dict its worker emitted."""
    cmd = [sys.executable, script, *(part for flag in flags.items() for part in flag)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{label} worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def run_quiet(run: Callable[[], R], label: str, args: Any, discarded: list) -> R:
    """Call ``run`` once the box is quiet; redo a run whose ``background_cores`` exceeds
    ``args.max_background`` (up to ``args.retries`` times; the last one is kept, flagged by its value)."""
    for _ in range(args.retries + 1):
        wait_for_quiet(args.quiet_percent, args.quiet_timeout)
        result = run()
        if result.background_cores <= args.max_background:
            return result
        print(f"    discarded {label}: other processes used {result.background_cores:.2f} cores", flush=True)
        discarded.append(result)
    return result
