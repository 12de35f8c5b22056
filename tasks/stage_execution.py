"""The life cycle every stage shares: cache -> lock -> MLflow stage run -> outputs.

The flow hands each task a ``StageCall`` whose fingerprint it has already computed.

1. Cache: a finished MLflow run tagged with the stage's fingerprint -> reuse its outputs, run nothing.
2. Lock (``tasks.fingerprint_lock``): a file lock per host plus, with a Prefect server, a global
   concurrency limit per fingerprint, so two identical runs never both train, on one host or on two;
   the second waits, then finds the first one's result in the cache.
3. Resume: an unfinished run with the same fingerprint is reopened, and training continues from the
   checkpoints in the fingerprint-keyed work dir (or the one uploaded with the run from another machine:
   ``tasks.checkpoint_sync``).
4. Outputs are recorded (the cache record) only after the stage's work succeeded; a failure marks
   the run FAILED and registers nothing.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny

from registry import stage_cache, tracking
from rlhf_core.data.loading import read_jsonl
from rlhf_core.refs import DatasetRef, ModelRef, StageOutput
from rlhf_core.settings import RLHFSettings
from rlhf_core.spec import reference_fields
from rlhf_core.training import PROGRESS_METRIC
from rlhf_core.training.checkpoint import latest_checkpoint
from tasks import checkpoint_sync, progress, stage_reports
from tasks.fingerprint_lock import fingerprint_lock

SUMMARY_PREFIX = "summary/"
STEP_LOG_MARK = "rlhf_step_log"  # ``extra`` key on per-step log records
INDEX = re.compile(r"\[(\d+)\]")  # MLflow tag keys allow no brackets


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


@dataclass
class StageRun:
    """Handle given to a stage's body: where to write, how to log."""

    stage: str
    run_id: str
    fingerprint: str
    work_dir: Path
    resumed: bool
    settings: RLHFSettings
    key_metrics: dict[str, float] = field(default_factory=dict)  # shown in the summary; logged as summary/*
    registered: str | None = None
    pipeline: str = ""
    kind: str = ""
    _progress_artifact: Any = field(default=None, repr=False)

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

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Per-step metrics to MLflow, one line in the Prefect log, the stage's progress artifact and a
        progress event (``tasks.progress``: the terminal's live view)."""
        tracking.log_metrics(self.run_id, metrics, step)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        # Marked, so that a live terminal view can keep these lines out of the console (not the API log).
        _logger().info("%s step %d: %s", self.stage, step, shown, extra={STEP_LOG_MARK: True})
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
            _logger().warning("stage %s: could not update the progress artifact: %s", self.stage, exc)


StageBody = Callable[[StageRun], dict[str, StageOutput]]


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


def execute_stage(ctx: RunContext, call: StageCall, body: StageBody) -> StageOutcome:
    """Run ``body`` for a stage unless its fingerprint is cached; see the module docstring.

    Whatever happened (ran, resumed, cached), the stage leaves a markdown artifact with its results in
    Prefect and a progress event for a live view.
    """
    from tasks.multiprocess import rank_job

    if (job := rank_job()) is not None:  # a training process of a multi-process stage: the body only
        return job.run_body(call, body)
    try:
        outcome = _execute_stage(ctx, call, body)
    except BaseException as exc:
        failed = progress.StageEvent(call.name, call.kind, progress.FAILED, "failed", message=str(exc))
        progress.publish(failed)
        raise
    _report_outcome(ctx, outcome)
    return outcome


def _execute_stage(ctx: RunContext, call: StageCall, body: StageBody) -> StageOutcome:
    forced = call.name in ctx.forced
    if not forced and (hit := cached_outcome(ctx, call)):
        return hit
    with fingerprint_lock(ctx.settings(), call.fingerprint, call.name):
        if not forced and (hit := cached_outcome(ctx, call)):
            return hit
        return _run_stage(ctx, call, body, forced)


def _report_outcome(ctx: RunContext, outcome: StageOutcome) -> None:
    """The stage's markdown artifact (Prefect) and its 'finished' progress event."""
    try:
        markdown = stage_reports.stage_markdown(
            outcome, ctx.experiment_id, tracking.ui_base_url(ctx.settings())
        )
    except Exception as exc:  # noqa: BLE001 - a report must never fail a stage that succeeded
        _logger().warning("stage %s: could not render its report: %s", outcome.stage, exc)
    else:
        stage_reports.create_markdown_artifact(
            markdown,
            key=stage_reports.artifact_key(ctx.pipeline, outcome.stage, "result"),
            description=stage_reports.stage_summary_line(outcome),
        )
    progress.publish(
        progress.StageEvent(
            outcome.stage, outcome.kind, progress.FINISHED, outcome.status, metrics=dict(outcome.metrics)
        )
    )


def _run_stage(ctx: RunContext, call: StageCall, body: StageBody, forced: bool) -> StageOutcome:
    stage, fingerprint = call.name, call.fingerprint
    settings = ctx.settings()
    work_dir = settings.work_dir(stage, fingerprint)
    if forced:
        shutil.rmtree(work_dir, ignore_errors=True)
    tags = {
        stage_cache.FINGERPRINT_TAG: fingerprint,
        "rlhf.kind": call.kind,
        "rlhf.git_commit": ctx.git_commit,
        "rlhf.spec_digest": ctx.spec_digest,
        "rlhf.pipeline_run_id": ctx.parent_run_id,
        **where_it_runs(),
    }
    interrupted = None if forced else stage_cache.find_interrupted_run(ctx.experiment_id, fingerprint)
    if interrupted is not None:  # trained on another machine: its checkpoint is stored with the run
        checkpoint_sync.fetch_checkpoint(interrupted, work_dir / "checkpoints", stage)
    resumable = interrupted is not None and latest_checkpoint(work_dir / "checkpoints") is not None
    if interrupted is not None and not resumable:
        stage_cache.mark_abandoned(interrupted)
    if resumable:
        run_id = interrupted
        tracking.reopen_run(run_id, {**tags, "rlhf.resumed": "true"})
        _logger().info("stage %s: resuming interrupted run %s from %s", stage, run_id, work_dir)
    else:
        run_id = tracking.start_stage_run(ctx.experiment_id, ctx.parent_run_id, stage, tags)
    work_dir.mkdir(parents=True, exist_ok=True)
    run = StageRun(
        stage, run_id, fingerprint, work_dir, resumable, settings, pipeline=ctx.pipeline, kind=call.kind
    )
    progress.publish(
        progress.StageEvent(stage, call.kind, progress.STARTED, "resuming" if resumable else "running")
    )
    started = time.perf_counter()
    try:
        # ``seed``: the seed the stage actually used (``config.seed`` is only the stage's own override).
        tracking.log_params(run_id, {"config": call.stage.model_dump(mode="json"), "seed": call.seed})
        tracking.log_dict(run_id, call.fingerprint_parts, "fingerprint_parts.json")  # for rlhf reproduce
        _log_inputs(run_id, stage, call.inputs)
        with checkpoint_sync.uploading(settings, run_id, work_dir / "checkpoints", stage):
            outputs = _run_body(ctx, call, body, run)
        tracking.log_metrics(run_id, {SUMMARY_PREFIX + k: v for k, v in run.key_metrics.items()}, step=0)
        stage_cache.record_stage_outputs(run_id, outputs)
        tracking.end_run(run_id, "FINISHED")
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
    checkpoint_sync.discard_checkpoints(run_id, stage)
    return StageOutcome(
        stage=stage,
        kind=call.kind,
        status="resumed" if resumable else "ran",
        fingerprint=fingerprint,
        run_id=run_id,
        outputs=outputs,
        metrics=run.key_metrics,
        registered=run.registered,
        seconds=time.perf_counter() - started,
    )


def where_it_runs() -> dict[str, str]:
    """Tags saying where a stage run executes: host, process, and the Prefect flow run (and deployment,
    when a work-pool worker runs it) that ran it."""
    import os
    import socket

    from prefect.runtime import deployment, flow_run

    tags = {"rlhf.host": socket.gethostname(), "rlhf.pid": str(os.getpid())}
    if flow_run.id:
        tags["prefect.stage_flow_run_id"] = str(flow_run.id)
    if deployment.id:
        tags["prefect.deployment"] = f"{flow_run.flow_name}/{deployment.name}"
    return tags


def _run_body(ctx: RunContext, call: StageCall, body: StageBody, run: StageRun) -> dict[str, StageOutput]:
    """The stage's work: here, or in ``compute.processes`` processes launched through accelerate."""
    compute = getattr(call.stage, "compute", None)
    if compute is None or compute.processes == 1:
        return body(run)
    from tasks.multiprocess import run_in_processes

    return run_in_processes(ctx, call, run)


def cached_outcome(ctx: RunContext, call: StageCall, status: str = "cached") -> StageOutcome | None:
    """The outcome of the finished run that produced ``call``'s fingerprint, if there is one."""
    cached = stage_cache.find_cached_stage(ctx.experiment_id, call.fingerprint)
    if cached is None:
        return None
    if status == "cached":
        _logger().info(
            "stage %s: cache hit (fingerprint %s, run %s)", call.name, call.fingerprint[:12], cached.run_id
        )
    registered = next(
        (
            f"{o.registered_name} v{o.registered_version}"
            for o in cached.outputs.values()
            if isinstance(o, ModelRef) and o.registered_name
        ),
        None,
    )
    key = {
        k.removeprefix(SUMMARY_PREFIX): v for k, v in cached.metrics.items() if k.startswith(SUMMARY_PREFIX)
    }
    return StageOutcome(
        stage=call.name,
        kind=call.kind,
        status=status,
        fingerprint=call.fingerprint,
        run_id=cached.run_id,
        outputs=cached.outputs,
        metrics=key,
        registered=registered,
    )


def _log_inputs(run_id: str, stage: str, inputs: dict[str, StageOutput]) -> None:
    from registry.datasets import log_dataset_input

    for name, ref in inputs.items():
        if isinstance(ref, DatasetRef):
            log_dataset_input(run_id, ref, context=f"{stage}.{name}")
    models = {
        "input." + INDEX.sub(r".\1", name): f"{ref.registered_name or ref.uri}"  # models[0] -> models.0
        + (f" v{ref.registered_version}" if ref.registered_version else "")
        for name, ref in inputs.items()
        if isinstance(ref, ModelRef)
    }
    if models:
        tracking.set_tags(run_id, models)


def _logger():
    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger("rlhf")


TRANSIENT_MARKERS = (
    "database is locked",
    "temporarily unavailable",
    "connection reset",
    "timed out",
    "503",
    "429",
    "max retries exceeded",  # MLflow's HTTP client after its own retries (a tracking server down)
    "connection refused",
)


def is_transient_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry network/tracking-store hiccups, never a bug or bad input."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # noqa: BLE001 - the state could not be read; judge that error instead
        exc = err
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return isinstance(exc, Exception) and any(m in str(exc).lower() for m in TRANSIENT_MARKERS)


def stage_task_run_name(parameters: dict[str, Any]) -> str:
    """A stage's task run is named after the stage (two SFT stages must not look alike): 'sft [sft]'."""
    call = parameters.get("call")
    if isinstance(call, dict):  # parameters given as JSON (a deployment's run)
        call = StageCall.model_construct(**call)
    return f"{call.name} [{call.kind}]" if call is not None else "stage"


STAGE_TASK_OPTIONS: dict[str, Any] = {
    "task_run_name": stage_task_run_name,
    "retries": 2,
    "retry_delay_seconds": 5,
    "retry_condition_fn": is_transient_failure,
    # The stage cache lives in MLflow (fingerprints); Prefect's own caching stays out of the way.
    "cache_policy": NO_CACHE,
}
