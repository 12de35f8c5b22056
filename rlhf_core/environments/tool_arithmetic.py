"""A synthetic tool-use task (book ch.13): arithmetic too large to do in one's head, and a calculator.

"What is 4821 * 793?" has one right answer, which a tiny model cannot compute token by token but can
copy from a calculator's result. The task's rows, generated offline and deterministically:

- ``sft``: tool-use trajectories (OpenAI-style messages): the user's question, an assistant turn that
  calls ``calculator`` with the question's expression, the tool's result (computed by the real built-in
  calculator), and the answer "The answer is N."; with the ``tools`` column (the calculator's
  declaration, exactly what the ``tools`` environment gives the model);
- ``prompts``: the question, its ``answer`` (for ``arithmetic_exact``) and ``gold_tool_calls`` (for the
  evaluation's exact match of tool name and arguments);
- ``preference``: trajectory pairs for DPO on *when to call a tool*: chosen = the trajectory above,
  rejected = answering at once with a nearby wrong number.

:func:`tool_use_corpus` is text for training a tiny model's tokenizer so that tool declarations and calls
are a few tokens each.
"""

from __future__ import annotations

import json
import operator
import random
from collections.abc import Callable
from typing import Any

from rlhf_core.environments.builtin_tools import builtin_tool
from rlhf_core.environments.tool_calls import ParsedCall, format_tool_calls
from rlhf_core.modeling.tokenizer import TOOL_CALL_FORMAT, TOOLS_INTRO

OPERATIONS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}
FORMATS = ("sft", "prompts", "preference")


def tool_arithmetic_problems(
    n: int,
    seed: int,
    *,
    min_operand: int = 100,
    max_operand: int = 9999,
    operations: tuple[str, ...] = ("*",),
) -> list[tuple[str, int]]:
    """``n`` (expression, answer) pairs ``a op b`` with a, b in [min_operand, max_operand]."""
    unknown = [op for op in operations if op not in OPERATIONS]
    if unknown or not operations:
        raise ValueError(f"operations must be a non-empty subset of {list(OPERATIONS)}, got {operations}")
    rng = random.Random(f"tool-arithmetic-{seed}")
    out = []
    for _ in range(n):
        a, b = rng.randint(min_operand, max_operand), rng.randint(min_operand, max_operand)
        op = rng.choice(operations)
        out.append((f"{a} {op} {b}", OPERATIONS[op](a, b)))
    return out


def calculator_declaration() -> dict:
    return builtin_tool("calculator").declaration()


def tool_trajectory(expression: str) -> list[dict]:
    """The conversation of a correct episode: question, calculator call, its result, the answer."""
    result = builtin_tool("calculator").function(expression=expression)
    call = {
        "id": "call_0_0",
        "type": "function",
        "function": {"name": "calculator", "arguments": {"expression": expression}},
    }
    return [
        {"role": "user", "content": f"What is {expression}?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0_0", "name": "calculator", "content": str(result)},
        {"role": "assistant", "content": f"The answer is {result}."},
    ]


def tool_arithmetic_records(fmt: str, n: int, seed: int, **problem_options: Any) -> list[dict]:
    """``n`` rows of the task in ``fmt`` (``sft``, ``prompts`` or ``preference``)."""
    if fmt not in FORMATS:
        raise ValueError(f"the tool_arithmetic task has formats {list(FORMATS)}, not {fmt!r}")
    tools = [calculator_declaration()]
    rows = []
    wrong = random.Random(f"tool-arithmetic-{seed}-rejected")
    for expression, answer in tool_arithmetic_problems(n, seed, **problem_options):
        question = f"What is {expression}?"
        if fmt == "prompts":
            gold = [{"name": "calculator", "arguments": {"expression": expression}}]
            rows.append({"prompt": question, "answer": str(answer), "gold_tool_calls": gold})
            continue
        trajectory = tool_trajectory(expression)
        if fmt == "sft":
            rows.append({"messages": trajectory, "tools": tools})
            continue
        guess = answer + wrong.choice([-1, 1]) * wrong.randint(1, max(10, abs(answer) // 100))
        rejected = [trajectory[0], {"role": "assistant", "content": f"The answer is {guess}."}]
        rows.append({"chosen": trajectory, "rejected": rejected, "tools": tools})
    return rows


def tool_use_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Text of tool-use conversations (declarations, calls, results, answers) for training a tokenizer."""
    declaration = json.dumps(calculator_declaration())
    lines = [TOOLS_INTRO, declaration, TOOL_CALL_FORMAT] * 200  # the system turn of every episode
    for expression, answer in tool_arithmetic_problems(n, seed, operations=tuple(OPERATIONS)):
        call = format_tool_calls([ParsedCall("calculator", {"expression": expression})], "hermes")
        lines += [f"What is {expression}?", call, "tool\n" + str(answer), f"The answer is {answer}."]
    return lines
