"""One scorer per ``function:`` value, whatever it names: a built-in or a user's function by reference.

:func:`reward_scorer` turns the spec's ``function`` and ``options`` into ``(completions, rows) ->
RewardBatch`` (cached per process: a user's file is imported once per content). :func:`check_scorer`
does the same work when the spec is read, so a bad reference or option fails before any stage runs, and
returns the options with the built-in's defaults filled in (what ``rlhf plan``, the MLflow params and
the fingerprint then show).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ValidationError

from rlhf_core.errors import UserError
from rlhf_core.rewards.functions import REGISTRY, VERIFIER_ALIASES, RegisteredReward, registered
from rlhf_core.rewards.reward_batch import RewardBatch
from rlhf_core.rewards.user_functions import (
    BatchScorer,
    as_batch_scorer,
    batch_result,
    check_signature,
    is_reference,
    load_function,
    parse_reference,
    reference_digest,
)


def reward_scorer(
    function: str, options: Mapping[str, Any] | None = None, *, verifier: bool = False
) -> BatchScorer:
    """The scorer ``function`` names (a registered name, ``file.py:fn`` with an absolute file, or
    ``module:fn``), with ``options`` bound. A file's scorer is cached by the digest of its code (the
    file and its local helpers), so an edit in a long-lived process scores with the edited code, the
    code its fingerprint names."""
    ref = parse_reference(function) if is_reference(function) else None
    code = reference_digest(ref) if ref is not None and ref.file is not None and ref.file.is_file() else ""
    return _scorer(function, json.dumps(dict(options or {}), sort_keys=True), verifier, code)


@lru_cache(maxsize=256)
def _scorer(function: str, options_json: str, verifier: bool, code: str) -> BatchScorer:
    options = json.loads(options_json)
    if is_reference(function):
        ref = parse_reference(function)
        fn = load_function(ref)
        check_signature(fn, ref.short, options)
        return as_batch_scorer(fn, ref.short, options)
    entry = registered(function, verifier=verifier)
    if entry.options is None:
        if options:
            raise UserError(f"reward function '{function}' takes no options (got {', '.join(options)})")
        assert callable(entry.function)
        return as_batch_scorer(entry.function, function, {})
    model = _builtin_options(function, entry, options)
    batch_fn = _attribute(str(entry.function))

    def score(completions: list[str], rows: list[dict]) -> RewardBatch:
        return batch_result(batch_fn(completions, rows, model), len(completions), function)

    return score


def check_scorer(
    function: str, options: Mapping[str, Any] | None = None, *, verifier: bool = False
) -> dict[str, Any]:
    """Load and check ``function`` with ``options`` now; the options with defaults filled in."""
    reward_scorer(function, options, verifier=verifier)
    if is_reference(function):
        return dict(options or {})
    entry = registered(function, verifier=verifier)
    if entry.options is None:
        return {}
    return _builtin_options(function, entry, options or {}).model_dump(mode="json")


def reads_columns(function: str) -> tuple[str, ...]:
    """Row columns a plain built-in needs (e.g. ``answer``); () for the rest (they check their own)."""
    entry = None if is_reference(function) else REGISTRY.get(VERIFIER_ALIASES.get(function, function))
    return entry.reads if entry is not None else ()


def verifier_function(
    function: str, options: Mapping[str, Any] | None = None
) -> Callable[[str, dict], float]:
    """A verifier as a per-completion function ``(completion, row) -> 1.0 | 0.0`` (evaluation's shape)."""
    scorer = reward_scorer(function, options, verifier=True)

    def verify(completion: str, row: dict) -> float:
        value = scorer([completion], [row]).scores[0]
        if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise UserError(
                f"verifier '{function}' returned {value!r}; a verifier returns 1.0 for a correct completion "
                "and 0.0 otherwise (a share in between counts as that much of a correct answer)"
            )
        return float(value)

    return verify


def _builtin_options(name: str, entry: RegisteredReward, options: Mapping[str, Any]) -> BaseModel:
    model_class = _attribute(str(entry.options))
    try:
        return model_class.model_validate(dict(options))
    except ValidationError as exc:
        problems = "; ".join(
            f"options.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise UserError(f"reward function '{name}': {problems}") from None


def _attribute(dotted: str) -> Any:
    module, _, attribute = dotted.partition(":")
    return getattr(importlib.import_module(module), attribute)
