"""Reward functions by name: the registry behind the spec's ``function: <name>`` sources and verifiers.

Verifiable rewards (RLVR, book ch.7) are functions of the completion and the prompt row (it may carry
the reference ``answer``, test cases, a schema). Built-ins are registered here by name so a spec can
refer to them declaratively; a user's own function is named by reference instead
(:mod:`rlhf_core.rewards.user_functions`). Two shapes are registered:

- a plain function ``(completion, record) -> float`` (the arithmetic task's rewards);
- a batched verifier ``(completions, rows, options) -> RewardBatch`` with a pydantic options model,
  given as ``"module:attribute"`` strings so that the spec can name them without importing their
  libraries (math-verify, the sandbox) until a stage scores with them.

A verifier is a registered function marked ``verifier=True``: it returns 1.0 for a correct completion
and 0.0 otherwise, so it can serve as a reward (sample, label_preferences) and as the check of accuracy
(evaluate).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from rlhf_core.data.synthetic import is_correct
from rlhf_core.errors import UserError

RewardFunction = Callable[[str, dict], float]


def arithmetic_exact(completion: str, record: dict) -> float:
    """1.0 when the completion's final answer equals the record's ``answer``, else 0.0."""
    return 1.0 if is_correct(completion, record["answer"]) else 0.0


def answer_format(completion: str, record: dict) -> float:
    """1.0 when the completion states its result as 'The answer is N.', else 0.0."""
    return 1.0 if re.search(r"The answer is -?\d+\.?\s*$", completion.strip()) else 0.0


def length_penalty(completion: str, record: dict, target_chars: int = 40) -> float:
    """-(characters beyond ``target_chars``) / target_chars: 0 for short completions, negative for long."""
    return -max(0, len(completion) - target_chars) / target_chars


@dataclass(frozen=True)
class RegisteredReward:
    """A named reward function; ``verifier`` when it returns 1.0 for a correct completion, else 0.0.

    ``options``: for a batched built-in, the ``"module:Model"`` of its options (``function`` is then a
    ``"module:function"`` taking ``(completions, rows, options)``). ``reads``: the row columns a plain
    function needs (checked before scoring)."""

    function: RewardFunction | str
    verifier: bool = False
    options: str | None = None
    reads: tuple[str, ...] = ()


_VERIFIERS = "rlhf_core.rewards.verifiers"
REGISTRY: dict[str, RegisteredReward] = {
    "arithmetic_exact": RegisteredReward(arithmetic_exact, verifier=True, reads=("answer",)),
    "answer_format": RegisteredReward(answer_format),  # 1/0 too, but it checks the form, not correctness
    "length_penalty": RegisteredReward(length_penalty),
    **{  # batched built-ins: rlhf_core.rewards.verifiers.<module>:<name> with its <Name>Options
        name: RegisteredReward(
            f"{_VERIFIERS}.{module}:{name}", verifier=verifier, options=f"{_VERIFIERS}.{module}:{options}"
        )
        for name, module, options, verifier in (
            ("math_answer", "math_answer", "MathAnswerOptions", True),
            ("code_tests", "code_tests", "CodeTestsOptions", True),
            ("exact_match", "string_match", "ExactMatchOptions", True),
            ("normalized_match", "string_match", "NormalizedMatchOptions", True),
            ("multiple_choice", "string_match", "MultipleChoiceOptions", True),
            ("regex_match", "string_match", "RegexMatchOptions", False),  # checks a form, not correctness
            ("json_schema", "string_match", "JsonSchemaOptions", False),
        )
    },
}
REWARD_FUNCTIONS: dict[str, RewardFunction] = {  # the plain built-ins, callable as (completion, record)
    name: entry.function for name, entry in REGISTRY.items() if callable(entry.function)
}
VERIFIERS: frozenset[str] = frozenset(name for name, entry in REGISTRY.items() if entry.verifier)
VERIFIER_ALIASES = {"arithmetic": "arithmetic_exact"}  # the evaluate stage's original `verifier: arithmetic`


def registered(name: str, *, verifier: bool = False) -> RegisteredReward:
    """The registry entry ``name`` (a verifier alias too); a UserError listing the known names."""
    resolved = VERIFIER_ALIASES.get(name, name) if verifier else name
    if resolved not in REGISTRY:
        known = ", ".join(sorted(VERIFIERS if verifier else REGISTRY))
        what = "verifier" if verifier else "reward function"
        raise UserError(
            f"unknown {what} '{name}' (built-in: {known}; "
            "or your own as 'file.py:function' or 'package.module:function')"
        )
    if verifier and not REGISTRY[resolved].verifier:
        raise UserError(
            f"'{name}' is a reward function but not a verifier; a verifier returns 1.0 for a correct "
            f"completion and 0.0 otherwise (built-in verifiers: {', '.join(sorted(VERIFIERS))})"
        )
    return REGISTRY[resolved]
