"""Dispatch: a stage whose ``compute`` names a work pool runs there, through its stage-runner deployment.

For such a stage the pipeline flow runs the :func:`dispatch_stage` task instead of the stage's own:

1. a finished MLflow run with the stage's fingerprint -> its outputs, and no job at all;
2. otherwise the stage is submitted to ``rlhf-stage/<pool>`` (:mod:`flows.stage_runner`) with the
   pool's job variables (:func:`flows.work_pools.job_variables_for`) and an idempotency key made of
   the pipeline's flow run, the fingerprint and the attempt: a retried pipeline gets its job back
   instead of a second one, and no two machines train one fingerprint anyway (the fingerprint lock);
3. it waits for the job's final state, telling when no worker has taken it yet;
4. Completed -> the outputs are read from MLflow by fingerprint (never from a Prefect result);
   Failed (the stage raised) -> the pipeline fails with the job's message; Crashed (killed worker,
   lost node) -> submitted again, up to ``compute.retries`` times: the stage resumes from its last
   checkpoint. Each new attempt shows in the Prefect UI: the dispatch task run is renamed
   ``<stage> [<kind>] on <pool> (attempt 2 of 3, after a crash)`` and the job's flow run is named
   ``<pipeline>-<stage>-<fingerprint[:8]> (attempt 2)``. A job that Prefect still shows running is taken
   for dead (its process was killed with its worker, or its machine was lost: nobody is left to report)
   and marked Crashed when its fingerprint's lock, once held, stays free for
   ``RLHF_DISPATCH_DEAD_AFTER_SECONDS`` (300; the lock's lease runs out when its holder stops renewing
   it), or was never taken within ``RLHF_DISPATCH_STARTUP_GRACE_SECONDS`` (900) of the job starting to
   run.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.stage_runner import call_parameters, stage_runner_deployment
from registry import tracking
from rlhf_core.errors import UserError
from rlhf_core.spec.compute import ComputeSpec
from runtime import progress
from runtime.stage_contract import RunContext, StageCall, StageOutcome
from runtime.stage_execution import cached_outcome

POLL_SECONDS = float(os.environ.get("RLHF_DISPATCH_POLL_SECONDS", "2"))
DEAD_AFTER_SECONDS = float(os.environ.get("RLHF_DISPATCH_DEAD_AFTER_SECONDS", "300"))
STARTUP_GRACE_SECONDS = float(os.environ.get("RLHF_DISPATCH_STARTUP_GRACE_SECONDS", "900"))
WAITING_NOTICE_SECONDS = 30.0


class StageJobFailed(RuntimeError):
    """A stage submitted to a work pool failed there (the stage raised) or kept crashing."""


def _task_run_name(parameters: dict[str, Any]) -> str:
    call, compute = parameters.get("call"), parameters.get("compute")
    if call is None or compute is None:
        return "dispatch"
    return dispatch_run_name(call, compute.pool)


def dispatch_run_name(call: StageCall, pool: str, attempt: int = 1, attempts: int = 1) -> str:
    """``sft [sft] on gpu``; from the second attempt on ``... (attempt 2 of 3, after a crash)``."""
    name = f"{call.name} [{call.kind}] on {pool}"
    return f"{name} (attempt {attempt} of {attempts}, after a crash)" if attempt > 1 else name


def _show_attempt(call: StageCall, compute: ComputeSpec, attempt: int) -> None:
    """Rename the running dispatch task run so that the Prefect UI's graph shows a resubmission."""
    from prefect import get_client
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is None:
        return
    name = dispatch_run_name(call, compute.pool, attempt, compute.retries + 1)
    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_name(context.task_run.id, name)
    except Exception as exc:  # noqa: BLE001 - a name helps reading the run; it never stops one
        get_run_logger().warning("stage %s: could not rename the task run: %s", call.name, exc)


@task(name="dispatch_stage", task_run_name=_task_run_name, cache_policy=NO_CACHE)
def dispatch_stage(ctx: RunContext, call: StageCall, compute: ComputeSpec, key_prefix: str) -> StageOutcome:
    """Run ``call`` on the work pool ``compute.pool`` (see the module docstring); its outcome."""
    if call.name not in ctx.forced and (hit := cached_outcome(ctx, call)):
        progress.publish(progress.StageEvent(call.name, call.kind, progress.FINISHED, "cached"))
        return hit
    from prefect import get_client

    with get_client(sync_client=True) as client:
        job_variables = stage_job_variables(client, call, compute)
    progress.publish(progress.StageEvent(call.name, call.kind, progress.STARTED, f"on {compute.pool}"))
    started = time.perf_counter()
    try:
        outcome = _run_on_pool(ctx, call, compute, job_variables, key_prefix)
    except BaseException as exc:
        progress.publish(
            progress.StageEvent(call.name, call.kind, progress.FAILED, "failed", message=str(exc))
        )
        raise
    outcome = outcome.model_copy(update={"seconds": time.perf_counter() - started})
    progress.publish(
        progress.StageEvent(
            call.name, call.kind, progress.FINISHED, outcome.status, metrics=dict(outcome.metrics)
        )
    )
    return outcome


def stage_job_variables(client: Any, call: StageCall, compute: ComputeSpec) -> dict[str, Any]:
    """The job variables of the stage's pool, checked against the pool's job template."""
    from prefect.exceptions import ObjectNotFound

    from flows.work_pools import job_variables_for

    try:
        pool = client.read_work_pool(compute.pool)
    except ObjectNotFound:
        raise UserError(
            f"stage '{call.name}', compute.pool: no work pool '{compute.pool}' on the Prefect server; "
            f"create it (rlhf pools create {compute.pool} --type process) and deploy the stage runners "
            "(rlhf deploy SPEC)"
        ) from None
    return job_variables_for(compute, pool.type, pool.base_job_template, call.name)


def _run_on_pool(
    ctx: RunContext, call: StageCall, compute: ComputeSpec, job_variables: dict[str, Any], key_prefix: str
) -> StageOutcome:
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    logger = get_run_logger()
    deployment = stage_runner_deployment(compute.pool)
    last_message = ""
    for attempt in range(compute.retries + 1):
        if attempt:
            _show_attempt(call, compute, attempt + 1)
        try:
            job = run_deployment(
                deployment,
                parameters=call_parameters(ctx, call, attempt + 1),
                idempotency_key=f"{key_prefix}:{call.fingerprint}:{attempt}",
                job_variables=job_variables,
                timeout=0,  # returns once the job is created; waiting is ours (liveness, notices)
                tags=[
                    f"pipeline:{ctx.pipeline}",
                    f"stage:{call.name}",
                    f"fingerprint:{call.fingerprint[:12]}",
                ],
            )
        except ObjectNotFound:
            raise UserError(
                f"stage '{call.name}', compute.pool: no deployment '{deployment}' on the Prefect server; "
                "create it with: rlhf deploy SPEC"
            ) from None
        logger.info(
            "stage %s: submitted to work pool %s as flow run %s (attempt %d of %d)",
            call.name, compute.pool, job.id, attempt + 1, compute.retries + 1,
        )  # fmt: skip
        with get_client(sync_client=True) as client:
            state = _wait_for_final_state(client, job.id, call, compute.pool)
        if state.is_completed():
            return _outcome_from_mlflow(ctx, call, job.id)
        last_message = f"flow run {job.id} ended {state.type.value}: {state.message or ''}".strip()
        if not state.is_crashed():
            raise StageJobFailed(f"stage '{call.name}' failed on work pool '{compute.pool}': {last_message}")
        logger.warning("stage %s: the job crashed (%s); submitting it again", call.name, last_message)
    raise StageJobFailed(
        f"stage '{call.name}' crashed on work pool '{compute.pool}' {compute.retries + 1} time(s); "
        f"last: {last_message}"
    )


def _wait_for_final_state(client: Any, flow_run_id: Any, call: StageCall, pool: str):
    """Poll the job until it is final; says once when no worker took it; a dead running job -> Crashed."""
    from prefect.states import Crashed

    from runtime.fingerprint_lock import lock_is_held

    logger = get_run_logger()
    submitted = time.monotonic()
    told_waiting = False
    running_since: float | None = None
    unheld_since: float | None = None
    seen_held = False
    while True:
        state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final():
            return state
        now = time.monotonic()
        if state is None or state.is_scheduled() or state.is_pending():
            if not told_waiting and now - submitted > WAITING_NOTICE_SECONDS:
                logger.info(
                    "stage %s: waiting for a worker of pool %s to take flow run %s",
                    call.name,
                    pool,
                    flow_run_id,
                )
                told_waiting = True
        elif state.is_running():
            running_since = running_since or now
            held = lock_is_held(call.fingerprint)
            seen_held = seen_held or held is True
            unheld_since = None if held is not False else (unheld_since or now)
            if _looks_dead(now, running_since, unheld_since, seen_held):
                what = "since its holder let go" if seen_held else f"in {STARTUP_GRACE_SECONDS:.0f} s"
                message = (
                    f"running, but nobody has held the stage's fingerprint lock {what}: its process is gone"
                )
                client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
                continue
        time.sleep(POLL_SECONDS)


def _looks_dead(now: float, running_since: float, unheld_since: float | None, seen_held: bool) -> bool:
    """A running job is taken for dead when its fingerprint lock, once held, has been free for
    ``DEAD_AFTER_SECONDS`` (its lease ran out: the holder stopped renewing it), or was never taken
    within ``STARTUP_GRACE_SECONDS`` of the job starting to run."""
    if unheld_since is None:
        return False
    if seen_held:
        return now - unheld_since > DEAD_AFTER_SECONDS
    return now - running_since > STARTUP_GRACE_SECONDS


def _outcome_from_mlflow(ctx: RunContext, call: StageCall, flow_run_id: Any) -> StageOutcome:
    """The stage's outcome as recorded in MLflow by the job: 'ran'/'resumed' by this pipeline run, or
    'cached' when another run had produced the fingerprint meanwhile."""
    outcome = cached_outcome(ctx, call, status="ran")
    if outcome is None:
        raise StageJobFailed(
            f"stage '{call.name}': its job (flow run {flow_run_id}) completed, but MLflow holds no finished "
            f"run with fingerprint {call.fingerprint[:12]}; is the worker writing to another tracking store "
            f"than {ctx.tracking_uri}?"
        )
    tags = tracking.client().get_run(outcome.run_id).data.tags
    if tags.get("rlhf.pipeline_run_id") != ctx.parent_run_id:
        status = "cached"
    else:
        status = "resumed" if tags.get("rlhf.resumed") == "true" else "ran"
    return outcome.model_copy(update={"status": status})
