"""What a stage's work may use of the place it runs in: plain values and callbacks.

Every stage kind's entry point in ``rlhf_core`` has one shape, ``run(stage, inputs, env) -> result``:
``stage`` is the stage's validated spec (or the settings it reads), ``inputs`` a small typed object of
its resolved inputs as local paths and rows, ``env`` a :class:`StageEnvironment`, and the result a
:class:`rlhf_core.stage_results.StageResult`. The environment is handed in, never looked up: no tracking
client, no Prefect, no global; the caller (``tasks/``) decides where a logged figure or table goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MetricsLogger = Callable[[dict[str, float], int], None]  # (metrics, step)
TableLogger = Callable[[list[dict], str], None]  # (rows, artifact file name, e.g. 'samples.json')


def _discard_metrics(metrics: dict[str, float], step: int) -> None:
    """The default ``log``: a stage run outside any tracking keeps no per-step figures."""


@dataclass(frozen=True)
class StageEnvironment:
    """Where a stage runs: its name (errors name it), seed, directories and loggers."""

    stage: str
    seed: int
    work_dir: Path  # the stage's own directory, keyed by its fingerprint
    cache_dir: Path  # shared between stages and runs (models, datasets, reference log-probs)
    checkpoint_dir: Path  # where a resumable stage keeps its checkpoints
    log: MetricsLogger = _discard_metrics
    log_table: TableLogger | None = None  # None: tables are not kept

    @classmethod
    def local(cls, stage: str, seed: int, work_dir: Path) -> StageEnvironment:
        """An environment under one directory, logging nothing (scripts, notebooks, tests)."""
        return cls(stage, seed, work_dir, work_dir / "cache", work_dir / "checkpoints")


@dataclass(frozen=True)
class NoInputs:
    """The inputs of a stage that reads no other stage's output (the ``dataset`` stage)."""
