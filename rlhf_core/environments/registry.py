"""Environments by name: the built-ins, or a user's class by reference (``envs.py:MyEnvironment`` or
``my_pkg.envs:MyEnvironment``), made once per episode with the spec's options as keyword arguments."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from rlhf_core.environments.base import Environment
from rlhf_core.environments.conversation import UserSimulator, VerifierFeedback
from rlhf_core.environments.tool_environment import ToolEnvironment
from rlhf_core.errors import UserError
from rlhf_core.rewards.user_functions import is_reference, load_function, parse_reference

BUILTIN_ENVIRONMENTS: dict[str, type] = {
    "tools": ToolEnvironment,
    "verifier_feedback": VerifierFeedback,
    "user_simulator": UserSimulator,
}

EnvironmentFactory = Callable[[], Environment]


def environment_class(name: str) -> type:
    """The class ``name`` names: a built-in, or a user's class by reference (loaded and checked)."""
    if not is_reference(name):
        if name not in BUILTIN_ENVIRONMENTS:
            raise UserError(
                f"unknown environment '{name}' (built-in: {', '.join(sorted(BUILTIN_ENVIRONMENTS))}; or "
                "your own class as 'envs.py:MyEnvironment' or 'package.module:MyEnvironment')"
            )
        return BUILTIN_ENVIRONMENTS[name]
    ref = parse_reference(name)
    found = load_function(ref)
    if not inspect.isclass(found):
        raise UserError(f"environment '{ref.short}' is a {type(found).__name__}, expected a class")
    missing = [m for m in ("reset", "step") if not callable(getattr(found, m, None))]
    if missing:
        raise UserError(
            f"environment '{ref.short}' has no {' or '.join(missing)} method; an environment has "
            "reset(row) -> EpisodeStart and step(assistant_message) -> StepResult "
            "(rlhf_core.environments.base)"
        )
    return found


def environment_factory(name: str, options: dict[str, Any]) -> EnvironmentFactory:
    """A maker of fresh environments (one per episode) of class ``name`` with ``options``; one is made now,
    so a bad option or a constructor that raises fails here, naming the environment."""
    cls = environment_class(name)
    short = parse_reference(name).short if is_reference(name) else name

    def make() -> Environment:
        try:
            return cls(**options)
        except UserError as exc:
            raise UserError(f"environment '{short}': {exc}") from None
        except TypeError as exc:
            raise UserError(
                f"environment '{short}': options {sorted(options)} do not fit it: {exc}"
            ) from None

    make()
    return make
