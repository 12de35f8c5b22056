"""The life cycle every stage shares: cache -> lock -> MLflow stage run -> outputs.

The flow hands each task a ``StageCall`` whose fingerprint it has already computed; the task (built by
``runtime.stage_tasks``) runs its kind's pre-run check, then :func:`execute_stage` with its kind's body.

1. Cache: a finished MLflow run tagged with the stage's fingerprint, in any experiment of the tracking
   store (the pipeline's own first: ``registry.stage_cache``) -> reuse its outputs, run nothing; a run
   of another pipeline is reported as ``cached`` with that pipeline's name (``StageOutcome.origin``).
2. Lock (``runtime.fingerprint_lock``): a file lock per host plus, with a Prefect server, a global
   concurrency limit per fingerprint, so two identical runs never both train, on one host or on two;
   the second waits, then finds the first one's result in the cache.
3. Resume: an unfinished run with the same fingerprint, in any experiment (same fingerprint, same
   work), is reopened where it is, and training continues from the checkpoints in the
   fingerprint-keyed work dir (or the one uploaded with the run from another machine:
   ``runtime.checkpoint_sync``).
4. Outputs are recorded (the cache record) only after the stage's work succeeded; a failure marks
   the run FAILED and registers nothing.
"""

from __future__ import annotations

import re
import shutil
import time

from registry import stage_cache, tracking
from rlhf_core.fingerprint import FUNCTION_PREFIX
from rlhf_core.refs import DatasetRef, ModelRef, StageOutput
from rlhf_core.rewards.user_functions import parse_reference
from rlhf_core.spec.function_references import function_reference_fields
from rlhf_core.training.engine.checkpoint import latest_checkpoint
from runtime import checkpoint_sync, progress, stage_reports
from runtime.fingerprint_lock import fingerprint_lock
from runtime.multiprocess import run_in_processes
from runtime.stage_contract import (
    SUMMARY_PREFIX,
    RunContext,
    StageBody,
    StageCall,
    StageOrigin,
    StageOutcome,
    StageRun,
    stage_logger,
)

INDEX = re.compile(r"\[(\d+)\]")  # MLflow tag keys allow no brackets


def execute_stage(ctx: RunContext, call: StageCall, body: StageBody) -> StageOutcome:
    """Run ``body`` for a stage unless its fingerprint is cached; see the module docstring.

    Whatever happened (ran, resumed, cached), the stage leaves a markdown artifact with its results in
    Prefect and a progress event for a live view. (A rank of a multi-process stage calls its kind's body
    directly: ``runtime.multiprocess.main``.)
    """
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
            outcome, outcome.experiment_of_run(ctx.experiment_id), tracking.ui_base_url(ctx.settings())
        )
    except Exception as exc:  # noqa: BLE001 - a report must never fail a stage that succeeded
        stage_logger().warning("stage %s: could not render its report: %s", outcome.stage, exc)
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
        **reward_function_tags(call),
    }
    interrupted = None if forced else stage_cache.find_interrupted_run(ctx.experiment_id, fingerprint)
    if interrupted is not None:  # trained on another machine: its checkpoint is stored with the run
        checkpoint_sync.fetch_checkpoint(interrupted, work_dir / "checkpoints", stage)
    resumable = interrupted is not None and latest_checkpoint(work_dir / "checkpoints") is not None
    if interrupted is not None and not resumable:
        stage_cache.mark_abandoned(interrupted)
    origin = None
    if resumable:
        run_id = interrupted
        origin = _origin_if_other(ctx, stage_cache.run_origin(run_id))
        tracking.reopen_run(run_id, {**tags, "rlhf.resumed": "true"})
        elsewhere = f" of pipeline {origin.pipeline}" if origin else ""
        stage_logger().info(
            "stage %s: resuming interrupted run %s%s from %s", stage, run_id, elsewhere, work_dir
        )
    else:
        run_id = tracking.start_stage_run(ctx.experiment_id, ctx.parent_run_id, stage, tags)
    work_dir.mkdir(parents=True, exist_ok=True)
    run = StageRun(stage, run_id, fingerprint, work_dir, resumable, settings, ctx, kind=call.kind)
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
        origin=origin,
    )


REWARD_FUNCTIONS_TAG = "rlhf.reward_functions"


def reward_function_tags(call: StageCall) -> dict[str, str]:
    """``rlhf.reward_functions``: each reward function named by reference and its code digest, e.g.
    ``rewards[0].function=rewards.py:score@1a2b3c4d5e6f`` (one per line), for lineage and model cards."""
    parts = call.fingerprint_parts
    lines = [
        f"{path}={parse_reference(ref).short}@{parts.get(FUNCTION_PREFIX + path, '')[:12]}"
        for path, ref in function_reference_fields(call.stage).items()
    ]
    return {REWARD_FUNCTIONS_TAG: "\n".join(lines)} if lines else {}


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
        return body(call, run)
    return run_in_processes(ctx, call, run, body)


def _origin_if_other(ctx: RunContext, found: stage_cache.RunOrigin) -> StageOrigin | None:
    """The run's pipeline when the run is in another experiment than the pipeline's; else None."""
    if found.experiment_id == ctx.experiment_id:
        return None
    return StageOrigin(
        pipeline=found.pipeline, experiment_id=found.experiment_id, pipeline_run_id=found.pipeline_run_id
    )


def cached_outcome(ctx: RunContext, call: StageCall, status: str = "cached") -> StageOutcome | None:
    """The outcome of the finished run that produced ``call``'s fingerprint, if there is one (in any
    experiment; ``origin`` says which pipeline when it is not this one)."""
    cached = stage_cache.find_cached_stage(ctx.experiment_id, call.fingerprint)
    if cached is None:
        return None
    origin = _origin_if_other(ctx, cached.origin)
    if status == "cached":
        where = (
            f" of pipeline {origin.pipeline}, pipeline run {origin.pipeline_run_id or 'unknown'}"
            if origin
            else ""
        )
        stage_logger().info(
            "stage %s: cache hit (fingerprint %s, run %s%s)",
            call.name,
            call.fingerprint[:12],
            cached.run_id,
            where,
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
        origin=origin,
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
