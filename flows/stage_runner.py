"""The stage-runner flow: one stage of a pipeline, run by a work-pool worker.

A stage whose ``compute`` names a work pool is not run in the pipeline's process: the pipeline flow
submits it to the stage-runner deployment of that pool (``rlhf-stage/<pool>``, created by ``rlhf
deploy``; see :mod:`flows.dispatch`). The worker starts this flow, which runs the stage's ordinary
task (cache, fingerprint lock, MLflow stage run, resume from checkpoints, registration), so a stage
behaves the same wherever it runs. Its outputs reach the pipeline through MLflow (looked up by
fingerprint), never through a Prefect result.

Parameters are plain JSON (the stage call and the pipeline's run context), so the run can be read
and re-run from the Prefect UI. The worker checks that it runs the same code as the pipeline that
submitted the stage: a worker with other code would produce other numbers under the same
fingerprint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from rlhf_core.errors import UserError
from rlhf_core.fingerprint import code_digest
from rlhf_core.rewards.user_functions import code_bundle, unpack_bundle
from rlhf_core.spec import STAGE_CLASSES
from rlhf_core.spec.function_references import function_reference_fields

STAGE_RUNNER_FLOW = "rlhf-stage"


def stage_runner_deployment(pool: str) -> str:
    """The full name of the stage-runner deployment of a work pool: ``rlhf-stage/<pool>``."""
    return f"{STAGE_RUNNER_FLOW}/{pool}"


def call_parameters(ctx: Any, call: Any, attempt: int = 1) -> dict[str, Any]:
    """The flow's parameters for one stage call (JSON): what :func:`run_stage` rebuilds them from.

    ``functions`` carries the code of every reward function the stage names by file
    (``rewards.py:score``): the worker may not have the pipeline's files."""
    functions = {ref: code_bundle(ref) for ref in function_reference_fields(call.stage).values()}
    return {
        "ctx": ctx.model_dump(mode="json"),
        "call": call.model_dump(mode="json"),
        "attempt": attempt,
        "functions": {ref: files for ref, files in functions.items() if files},
    }


def with_local_functions(call: dict[str, Any], functions: dict[str, dict[str, str]], cache_dir: Path) -> dict:
    """The call's JSON with each shipped reward file's reference pointing at a copy here (written under
    ``cache_dir``) when this machine lacks the file or has another version of it."""
    moved = {ref: unpack_bundle(ref, files, cache_dir) for ref, files in functions.items()}

    def rewrite(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: rewrite(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        return moved.get(value, value) if isinstance(value, str) else value

    return {**call, "stage": rewrite(call["stage"])}


def rebuild_call(data: dict[str, Any]):
    """A StageCall from its JSON: the stage's spec is rebuilt as its kind's class."""
    from runtime.stage_contract import StageCall

    kind = data.get("kind")
    if kind not in STAGE_CLASSES:
        raise UserError(
            f"stage runner: unknown stage kind {kind!r} (this worker knows {sorted(STAGE_CLASSES)})"
        )
    stage = STAGE_CLASSES[kind].model_validate(data["stage"])
    return StageCall.model_validate({**data, "stage": stage})


def _run_name() -> str:
    return stage_run_name(flow_run.parameters)


def stage_run_name(parameters: dict[str, Any]) -> str:
    """``<pipeline>-<stage>-<fingerprint[:8]>``, with `` (attempt N)`` when the pipeline resubmitted it."""
    call = parameters.get("call") or {}
    ctx = parameters.get("ctx") or {}
    fingerprint = str(call.get("fingerprint", ""))[:8]
    name = f"{ctx.get('pipeline', 'pipeline')}-{call.get('name', 'stage')}-{fingerprint}"
    attempt = parameters.get("attempt") or 1
    return f"{name} (attempt {attempt})" if attempt > 1 else name


@flow(name=STAGE_RUNNER_FLOW, flow_run_name=_run_name, log_prints=True, persist_result=False)
def run_stage(
    ctx: dict[str, Any], call: dict[str, Any], attempt: int = 1, functions: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one stage of a pipeline here (a work-pool worker); returns its outcome as JSON.

    ``attempt`` counts the pipeline's submissions of this stage (2 after a crash); it names the run.
    ``functions``: the code of the reward files the stage names (:func:`call_parameters`).

    The worker's ``RLHF_HOME`` (if set) is where its checkpoints and caches go; otherwise the
    pipeline's home, which machines then share (a network file system).
    """
    from flows.code_version import UNKNOWN_COMMIT, code_commit
    from registry import tracking
    from rlhf_core.settings import apply_environment_defaults
    from runtime.stage_contract import RunContext
    from runtime.stage_tasks import task_for_kind

    context = RunContext.model_validate(ctx)
    if os.environ.get("RLHF_HOME"):
        context = context.model_copy(update={"home": os.environ["RLHF_HOME"]})
    if context.git_commit == UNKNOWN_COMMIT:  # e.g. a pipeline run outside git: this deployment's version
        context = context.model_copy(update={"git_commit": code_commit()})
    settings = context.settings()
    if functions:
        call = with_local_functions(call, functions, settings.resolved_home() / "cache")
    stage_call = rebuild_call(call)
    check_same_code(stage_call.name, stage_call.fingerprint_parts.get("code"))
    apply_environment_defaults(settings)
    tracking.configure(settings)
    outcome = task_for_kind(stage_call.kind)(context, stage_call)
    return outcome.model_dump(mode="json")


def check_same_code(stage: str, expected: str | None) -> None:
    """UserError when this worker's rlhf_core differs from the code the stage was fingerprinted with."""
    here = code_digest()
    if expected is not None and expected != here:
        raise UserError(
            f"stage '{stage}': this worker runs other rlhf_core code (digest {here[:12]}) than the pipeline "
            f"that submitted it ({expected[:12]}); install the same version on the worker (or its image)"
        )
