"""Contenders run in fresh subprocesses: the worker prints one result line, the driver reads it back
and redoes a run that other processes disturbed (keeping the disturbed one aside as discarded)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from machine_load import wait_for_quiet

RESULT_PREFIX = "RESULT "
RESULTS_DIR = Path(__file__).parent / "results"
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


def contender_flags(contender: str, model_dir: Any, settings: Any) -> dict[str, str]:
    """The internal flags that make a benchmark script run one contender on a model with settings."""
    return {"--worker": contender, "--model-dir": str(model_dir), "--settings": json.dumps(asdict(settings))}


def run_contender(
    script: str, result_type: Callable[..., R], contender: str, model_dir: Any, settings: Any
) -> R:
    """One contender of ``script`` in a fresh subprocess, its result as ``result_type``."""
    return result_type(**run_worker(script, contender, contender_flags(contender, model_dir, settings)))


def run_contender_quietly(
    script: str,
    result_type: Callable[..., R],
    contender: str,
    model_dir: Any,
    settings: Any,
    args: Any,
    discarded: list,
) -> R:
    """:func:`run_contender` once the machine is quiet, redone when disturbed (see :func:`run_quiet`)."""
    return run_quiet(
        lambda: run_contender(script, result_type, contender, model_dir, settings), contender, args, discarded
    )


def add_measurement_options(parser: Any, report_name: str, contenders: tuple[str, ...]) -> None:
    """The options every benchmark shares: waiting for a quiet machine, redoing disturbed runs, where the
    JSON goes, and the internal flags of a worker process (one contender)."""
    parser.add_argument(
        "--quiet-percent",
        type=float,
        default=15.0,
        help="Start a run only once total CPU use stays below this percent for 3 s.",
    )
    parser.add_argument(
        "--quiet-timeout", type=float, default=900.0, help="Give up waiting for quiet after this."
    )
    parser.add_argument(
        "--max-background",
        type=float,
        default=0.15,
        help="Redo a run when other processes used more than this many cores while it was timed.",
    )
    parser.add_argument("--retries", type=int, default=3, help="Redos of a disturbed run before keeping it.")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR / report_name, help="Where the JSON report goes."
    )
    parser.add_argument("--worker", choices=contenders, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
