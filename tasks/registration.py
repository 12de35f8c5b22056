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

from rlhf_core.spec import StageSpec

STAGE_TASKS: dict[str, Task] = {}


def stage_task(spec_class: type[StageSpec], **task_options: Any) -> Callable[[Callable], Task]:
    """Make a function the Prefect task of the stage kind declared by ``spec_class``."""
    from tasks.stage_execution import STAGE_TASK_OPTIONS

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
    import tasks

    for module in pkgutil.iter_modules(tasks.__path__):
        importlib.import_module(f"tasks.{module.name}")
