"""Resumable checkpoints: model, optimizer, scheduler, RNG states and data position.

A checkpoint is a directory ``step-<N>`` written by ``accelerate.Accelerator.save_state`` (model,
optimizer, scheduler, python/numpy/torch RNG states) plus ``trainer_state.json`` (the step, which fixes
the data position because batch order is a pure function of seed and epoch). It is written under a
temporary name and renamed, so a crash mid-write never leaves a half checkpoint that looks whole.

With several training processes every rank calls ``save_state`` (accelerate writes model, optimizer
and scheduler from the main process and one RNG file per rank); only the main process clears,
renames and prunes, with barriers around, so no rank writes into a directory being moved.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only a type here: listing checkpoints must not import torch
    from accelerate import Accelerator

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def save_checkpoint(
    accelerator: Accelerator, directory: Path, step: int, state: dict[str, Any], keep: int = 2
) -> Path:
    """Write ``directory/step-<step>`` atomically and keep only the newest ``keep`` checkpoints.

    Called by every rank (a no-op barrier in a single process)."""
    main = accelerator.is_main_process
    final = directory / f"step-{step}"
    tmp = directory / f".step-{step}.tmp"
    if main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every rank's RNG file is in tmp before it is renamed
    if main:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).exists()]


def latest_checkpoint(directory: Path) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer state (with ``step``)."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())
