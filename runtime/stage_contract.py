"""The contract between the flow, the stage life cycle and a stage kind's body.

- ``RunContext``: the pipeline run a stage belongs to (experiment, parent run, home, forced stages);
- ``StageCall``: what the flow hands a stage's task (the stage, its inputs as refs, its fingerprint);
- ``StageRun``: the handle a stage's body works with (work dir, settings, the run context, logging,
  inputs as files);
- ``StageBody``: a stage kind's work, ``(call, run) -> outputs``; ``StageCheck``: its pre-run checks,
  ``(call) -> None``, raising before any MLflow stage run is opened;
- ``StageOutcome``: what happened to the stage (ran, resumed, cached) and what it produced.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny

from registry import tracking
from rlhf_core.data.loading import read_jsonl
from rlhf_core.refs import DatasetRef, ModelRef, StageOutput
from rlhf_core.settings import RLHFSettings
from rlhf_core.spec import reference_fields
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training import PROGRESS_METRIC
from runtime import progress

SUMMARY_PREFIX = "summary/"  # a stage's key metrics are logged under this prefix
STEP_LOG_MARK = "rlhf_step_log"  # ``extra`` key on per-step log records


class RunContext(BaseModel):
    """What every stage task needs to know about the pipeline run it belongs to."""

    model_config = ConfigDict(frozen=True)

    pipeline: str
    experiment_id: str
    parent_run_id: str
    home: str = Field(description="RLHF home directory (work dirs, locks, caches).")
    git_commit: str = "unknown"
    spec_digest: str = Field(default="", description="sha256 of the resolved pipeline spec.")
    forced: tuple[str, ...] = Field(default=(), description="Stages that must run even when cached.")
    tracking_uri: str | None = Field(
        default=None,
        description="The pipeline's MLflow tracking URI, so a stage run by a work-pool worker writes to "
        "the same store; None: the home's default store.",
    )

    def settings(self) -> RLHFSettings:
        if self.tracking_uri is None:
            return RLHFSettings(home=Path(self.home))
        return RLHFSettings(home=Path(self.home), tracking_uri=self.tracking_uri)


class StageOrigin(BaseModel):
    """The pipeline whose run produced a stage's outputs, when it is not the pipeline being run."""

    model_config = ConfigDict(frozen=True)

    pipeline: str = Field(description="The producing pipeline: the name of the experiment holding the run.")
    experiment_id: str = Field(description="The MLflow experiment holding the run.")
    pipeline_run_id: str = Field(default="", description="The producing pipeline's MLflow parent run.")


class StageOutcome(BaseModel):
    """What happened to one stage in one pipeline run (drives the summary table)."""

    stage: str
    kind: str
    status: str = Field(description="'ran', 'resumed' or 'cached'.")
    fingerprint: str
    run_id: str
    outputs: dict[str, StageOutput]
    metrics: dict[str, float] = Field(default_factory=dict)
    registered: str | None = Field(
        default=None, description="'<name> v<version>' when a model was registered."
    )
    seconds: float = 0.0
    origin: StageOrigin | None = Field(
        default=None,
        description="Set when ``run_id`` belongs to another pipeline's experiment (its result was reused, "
        "or its interrupted run resumed); None: the pipeline's own experiment.",
    )

    def experiment_of_run(self, own_experiment_id: str) -> str:
        """The experiment holding ``run_id`` (for links to its MLflow page)."""
        return self.origin.experiment_id if self.origin else own_experiment_id

    def origin_text(self) -> str:
        """'' for the pipeline's own run; else 'from pipeline <name>' (what the summary and reports say)."""
        return f"from pipeline {self.origin.pipeline}" if self.origin else ""


@dataclass
class StageRun:
    """Handle given to a stage's body: where to write, how to log, the pipeline run it belongs to."""

    stage: str
    run_id: str
    fingerprint: str
    work_dir: Path
    resumed: bool
    settings: RLHFSettings
    context: RunContext  # the pipeline run (name, commit, spec digest): handed over, never a global
    key_metrics: dict[str, float] = field(default_factory=dict)  # shown in the summary; logged as summary/*
    registered: str | None = None
    kind: str = ""
    _progress_artifact: Any = field(default=None, repr=False)

    @property
    def pipeline(self) -> str:
        return self.context.pipeline

    def model_dir(self, ref: ModelRef) -> str:
        """A local directory (or hub name) holding the model of ``ref``, downloaded once per digest."""
        from registry.models import materialize_model

        return materialize_model(ref, self.settings.resolved_home() / "cache" / "models")

    def read_split(self, ref: DatasetRef, split: str) -> list[dict]:
        """The rows of one split of a dataset ref (downloaded once per digest)."""
        from registry.datasets import materialize_dataset

        return read_jsonl(
            materialize_dataset(ref, self.settings.resolved_home() / "cache" / "datasets") / f"{split}.jsonl"
        )

    def environment(self, seed: int) -> StageEnvironment:
        """What a stage kind's ``rlhf_core`` entry point gets: this run's directories, its per-step log
        and its tables as artifacts of the run."""
        return StageEnvironment(
            self.stage, seed, self.work_dir, self.settings.resolved_home() / "cache",
            self.work_dir / "checkpoints", log=self.log, log_table=self.log_table,
        )  # fmt: skip

    def log_table(self, rows: list[dict], name: str) -> None:
        """A table (rows of a JSON object) as the artifact ``name`` of the run."""
        tracking.log_table(self.run_id, rows, name)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Per-step metrics to MLflow, one line in the Prefect log, the stage's progress artifact and a
        progress event (``runtime.progress``: the terminal's live view)."""
        tracking.log_metrics(self.run_id, metrics, step)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        # Marked, so that a live terminal view can keep these lines out of the console (not the API log).
        stage_logger().info("%s step %d: %s", self.stage, step, shown, extra={STEP_LOG_MARK: True})
        if PROGRESS_METRIC in metrics:
            self._report_progress(100.0 * metrics[PROGRESS_METRIC], step)
            if progress.has_listeners():
                fraction = metrics[PROGRESS_METRIC]
                total = round(step / fraction) if fraction > 0 else None
                progress.publish(
                    progress.StageEvent(
                        self.stage, self.kind, progress.STEP, "running", step, total, dict(metrics)
                    )
                )
        elif progress.has_listeners():
            event = progress.StageEvent(
                self.stage, self.kind, progress.DETAIL, "running", step, None, dict(metrics)
            )
            progress.publish(event)

    def _report_progress(self, percent: float, step: int) -> None:
        """A Prefect progress artifact per stage run (key ``<pipeline>-<stage>-progress``), updated in
        place; shown on the task run and the Artifacts page. Outside a Prefect run it does nothing."""
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is None:
            return
        description = f"{self.stage}: step {step} (MLflow run {self.run_id})"
        try:
            if self._progress_artifact is None:
                key = re.sub(r"[^a-z0-9-]+", "-", f"{self.pipeline}-{self.stage}-progress".lower()).strip("-")
                self._progress_artifact = create_progress_artifact(percent, key=key, description=description)
            else:
                update_progress_artifact(self._progress_artifact, percent, description=description)
        except Exception as exc:  # progress display must never stop a training run
            stage_logger().warning("stage %s: could not update the progress artifact: %s", self.stage, exc)


class StageCall(BaseModel):
    """What the flow hands a stage's task: the stage, its inputs resolved to refs, and its fingerprint.

    The fingerprint is computed by the flow before the call (``flows.stage_calls``), with the function
    ``rlhf plan`` and the cache use; the task never computes one.
    """

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="Stage name (or ``models:`` entry).")
    kind: str = Field(description="Stage kind, or 'base_model'.")
    stage: SerializeAsAny[BaseModel] = Field(description="The stage's validated spec.")
    seed: int
    fingerprint: str
    inputs: dict[str, StageOutput] = Field(
        default_factory=dict, description="Reference field path (e.g. 'rewards[0].model') -> resolved ref."
    )
    fingerprint_parts: dict[str, str] = Field(
        default_factory=dict, description="What the fingerprint hashes, by part (rlhf_core.fingerprint)."
    )

    def resolve(self, reference: str) -> StageOutput:
        """The ref that a reference text of this stage (e.g. ``stage.model``) resolved to."""
        for path, (text, _) in reference_fields(self.stage).items():
            if text == reference:
                return self.inputs[path]
        raise KeyError(f"stage '{self.name}' has no input named {reference!r}")


StageBody = Callable[[StageCall, StageRun], dict[str, StageOutput]]
StageCheck = Callable[[StageCall], None]


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a run, else the ``rlhf`` logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("rlhf")
