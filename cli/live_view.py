"""The live terminal view of ``rlhf run``: one row per stage with its state, step/total, ETA and key metric.

Shown only when the output is a terminal (and ``RLHF_LIVE_VIEW`` is not ``0``); redirected output and CI
keep the plain log lines. While the view is up, the per-step log lines (``runtime.stage_execution``
marks them) are kept out of the console, since the view shows the same numbers in place; everything
else Prefect logs still prints above the view, and the Prefect API log keeps every line.
The view listens to the stage events of ``runtime.progress``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from rlhf_core.spec import PipelineSpec
from runtime import progress
from runtime.stage_contract import STEP_LOG_MARK

STATE_STYLES = {
    "pending": "dim",
    "running": "bold blue",
    "resuming": "bold yellow",
    "ran": "green",
    "resumed": "yellow",
    "cached": "cyan",
    "failed": "bold red",
}
# Logged with every progress step; never a stage's key metric.
BOOKKEEPING = {"train/progress", "train/lr", "train/epoch", "train/tokens_per_second", "train/grad_norm"}
# On-policy RL's rollout pipeline (logged with each rollout): shown after the key metric, by these labels.
PIPELINE_DETAILS = {
    "rollout/async/staleness_mean": "stale",
    "rollout/idle/trainer_share": "trainer idle",
    "rollout/idle/engine_share": "engine idle",
}


@dataclass
class StageRow:
    name: str
    kind: str
    state: str = "pending"
    step: int | None = None
    total: int | None = None
    metric: tuple[str, float] | None = None
    details: dict[str, float] = field(default_factory=dict)  # PIPELINE_DETAILS label -> latest value
    started: float | None = None
    rate_base: tuple[float, int] | None = None  # (time, step) the step rate is measured from
    ended: float | None = None

    def metric_text(self) -> str:
        """The key metric, then the rollout pipeline's details (shares as percentages)."""
        parts = [f"{self.metric[0]}={self.metric[1]:.4g}"] if self.metric else []
        for label, value in self.details.items():
            parts.append(f"{label} {value:.0%}" if "idle" in label else f"{label} {value:.2g}")
        return " · ".join(parts)

    def eta_seconds(self, now: float) -> float | None:
        if self.rate_base is None or self.step is None or not self.total:
            return None
        since, first = self.rate_base
        if self.step <= first or now <= since:
            return None
        return (self.total - self.step) * (now - since) / (self.step - first)


def key_metric(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The metric a row shows: the first one that is not bookkeeping (loss, reward, accuracy ...)."""
    return next(((k, v) for k, v in metrics.items() if k not in BOOKKEEPING), None)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


class PipelineView:
    """The rows of a pipeline run, updated from stage events (any thread) and rendered by rich."""

    def __init__(self, spec: PipelineSpec, clock=time.monotonic):
        self.name = spec.name
        self.clock = clock
        self.started = clock()
        self.rows = {n: StageRow(n, "base model") for n in spec.models}
        self.rows |= {n: StageRow(n, spec.stages[n].kind) for n in spec.topological_order()}
        self._lock = threading.Lock()

    def on_event(self, event: progress.StageEvent) -> None:
        with self._lock:
            row = self.rows.setdefault(event.stage, StageRow(event.stage, event.kind))
            now = event.time
            row.details |= {
                label: event.metrics[k] for k, label in PIPELINE_DETAILS.items() if k in event.metrics
            }
            if event.event == progress.DETAIL:
                return
            row.state = event.status
            if event.event == progress.STARTED:
                # a resumed stage's rate is measured from the first step it logs after its checkpoint
                row.started, row.ended = now, None
                row.rate_base = (now, 0) if event.status == "running" else None
            elif event.event == progress.STEP:
                row.started = now if row.started is None else row.started
                row.rate_base = row.rate_base or (now, event.step or 0)
                row.step, row.total = event.step, event.total
                row.metric = key_metric(event.metrics) or row.metric
            else:  # finished or failed
                row.ended = now
                if event.status in ("ran", "resumed") and row.total:
                    row.step = row.total
                row.metric = key_metric(event.metrics) or row.metric

    def render(self) -> Table:
        now = self.clock()
        with self._lock:
            rows = list(self.rows.values())
        table = Table(
            title=f"pipeline {self.name}  ·  {_duration(now - self.started)}",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            expand=False,
        )
        # On a narrow terminal the key metric is cut first; names, states and numbers keep their width.
        longest = max((len(r.name) for r in rows), default=5)
        for column, width in (("stage", longest), ("state", 8), ("step", 16), ("time", 4), ("ETA", 4)):
            table.add_column(column, no_wrap=True, min_width=width)
        table.add_column("key metric", no_wrap=True, overflow="ellipsis", max_width=72)
        for row in rows:
            running = row.state in ("running", "resuming")
            elapsed = (row.ended or now) - row.started if row.started is not None else None
            table.add_row(
                row.name,
                Text(row.state, style=STATE_STYLES.get(row.state, "")),
                _step_cell(row.step, row.total),
                _duration(elapsed),
                _duration(row.eta_seconds(now)) if running else "",
                row.metric_text(),
            )
        return table


def _step_cell(step: int | None, total: int | None, width: int = 10) -> Text:
    """A bar and 'step/total' ('━━━━━━━━── 24/40'); empty for stages that report no steps."""
    if not total:
        return Text("")
    filled = min(width, round(width * (step or 0) / total))
    return Text.assemble(("━" * filled, "green"), ("─" * (width - filled), "grey50"), f" {step or 0}/{total}")


class _DropStepLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, STEP_LOG_MARK, False)


def _prefect_console_handlers() -> list[logging.Handler]:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [
        logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    found: dict[int, logging.Handler] = {}
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                found[id(handler)] = handler
    return list(found.values())


def live_view_wanted(console: Console) -> bool:
    return console.is_terminal and os.environ.get("RLHF_LIVE_VIEW", "1") != "0"


@contextmanager
def live_pipeline_view(spec: PipelineSpec, console: Console) -> Iterator[PipelineView | None]:
    """Show the live view of ``spec``'s run on ``console`` while the block runs (terminal only)."""
    if not live_view_wanted(console):
        yield None
        return
    view = PipelineView(spec)
    handlers = _prefect_console_handlers()
    step_filter = _DropStepLines()
    saved = [(h, getattr(h, "console", None)) for h in handlers]
    # get_renderable: re-rendered on every refresh, so elapsed times and ETAs tick between events
    with Live(console=console, refresh_per_second=4, get_renderable=view.render) as live:
        for handler in handlers:
            handler.addFilter(step_filter)
            handler.console = console  # printed above the view instead of through it
        try:
            with progress.subscribed(view.on_event):
                yield view
        finally:
            for handler, original in saved:
                handler.removeFilter(step_filter)
                if original is not None:
                    handler.console = original
            live.update(view.render(), refresh=True)
