"""Stage tasks registered against their stage kind.

A task module declares ``@stage_task(SFTStage)`` on its task function; the flow finds the task of a
stage with :func:`task_for_kind`. Every module of the ``tasks`` package is imported the first time a
task is looked up, so a new kind's task needs no list to be added to.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, get_args

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from rlhf_core.spec import StageSpec
from runtime.stage_contract import StageCall

STAGE_TASKS: dict[str, Task] = {}
TASK_PACKAGE = "tasks"  # where the stage kinds' task modules live


def stage_task(spec_class: type[StageSpec], **task_options: Any) -> Callable[[Callable], Task]:
    """Make a function the Prefect task of the stage kind declared by ``spec_class``."""
    (kind,) = get_args(spec_class.model_fields["kind"].annotation)

    def register(fn: Callable) -> Task:
        if kind in STAGE_TASKS and STAGE_TASKS[kind].fn.__qualname__ != fn.__qualname__:
            raise TypeError(f"stage kind {kind!r} has two tasks: {STAGE_TASKS[kind].name} and {fn.__name__}")
        registered = task(name=fn.__name__, **{**STAGE_TASK_OPTIONS, **task_options})(fn)
        STAGE_TASKS[kind] = registered
        return registered

    return register


def task_for_kind(kind: str) -> Task:
    """The task registered for a stage kind; TypeError if none is."""
    _import_task_modules()
    if kind not in STAGE_TASKS:
        raise TypeError(
            f"no task is registered for stage kind {kind!r} (known: {', '.join(sorted(STAGE_TASKS))})"
        )
    return STAGE_TASKS[kind]


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
