"""Stage kinds: each kind's body and pre-run check, and the Prefect task built from them.

A task module declares its kind's work as a named top-level function::

    @stage_task(SFTStage, check=check_sft_inputs)
    def train_sft(call: StageCall, run: StageRun) -> dict[str, StageOutput]: ...

and this module builds the kind's Prefect task (named after the function, ``train_sft``): it runs the
check (``check(call)``: bad inputs fail before any MLflow stage run is opened), then
``execute_stage(ctx, call, body)`` (cache, lock, stage run, outputs). The flow finds a stage's task with
:func:`task_for_kind`; a rank of a multi-process stage finds the body with :func:`stage_kind`. Every
module of the ``tasks`` package is imported the first time a kind is looked up, so a new kind needs no
list to be added to.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from runtime.stage_contract import RunContext, StageBody, StageCall, StageCheck, StageOutcome
from runtime.stage_execution import execute_stage


@dataclass(frozen=True)
class StageKind:
    """What is registered for a stage kind: its body, its pre-run check and the Prefect task of both."""

    kind: str
    body: StageBody
    check: StageCheck | None
    task: Task


STAGE_KINDS: dict[str, StageKind] = {}
TASK_PACKAGE = "tasks"  # where the stage kinds' task modules live


def stage_task(
    spec_class: type[BaseModel],
    *,
    kind: str | None = None,
    check: StageCheck | None = None,
    **task_options: Any,
) -> Callable[[StageBody], StageBody]:
    """Register a function as the body of the stage kind declared by ``spec_class`` (or ``kind``, for a
    spec without a ``kind`` field) and build its Prefect task; the body is returned as it is."""
    if kind is None:
        (kind,) = get_args(spec_class.model_fields["kind"].annotation)

    def register(body: StageBody) -> StageBody:
        known = STAGE_KINDS.get(kind)
        if known is not None and known.body.__qualname__ != body.__qualname__:
            raise TypeError(f"stage kind {kind!r} has two tasks: {known.task.name} and {body.__name__}")

        def run_stage(ctx: RunContext, call: StageCall) -> StageOutcome:
            if check is not None:
                check(call)
            return execute_stage(ctx, call, body)

        # named as the body: Prefect's task key and the task name in the UI come from these
        run_stage.__name__, run_stage.__qualname__ = body.__name__, body.__qualname__
        run_stage.__module__, run_stage.__doc__ = body.__module__, body.__doc__
        registered = task(name=body.__name__, **{**STAGE_TASK_OPTIONS, **task_options})(run_stage)
        STAGE_KINDS[kind] = StageKind(kind, body, check, registered)
        return body

    return register


def stage_kind(kind: str) -> StageKind:
    """What is registered for a stage kind; TypeError if nothing is."""
    _import_task_modules()
    if kind not in STAGE_KINDS:
        raise TypeError(
            f"no task is registered for stage kind {kind!r} (known: {', '.join(sorted(STAGE_KINDS))})"
        )
    return STAGE_KINDS[kind]


def task_for_kind(kind: str) -> Task:
    """The Prefect task of a stage kind; TypeError if none is registered."""
    return stage_kind(kind).task


def _import_task_modules() -> None:
    # by name, not by import: the task modules sit above this package and register themselves here
    package = importlib.import_module(TASK_PACKAGE)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{TASK_PACKAGE}.{module.name}")


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
