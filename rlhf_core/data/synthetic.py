"""A deterministic synthetic arithmetic task with a verifiable answer.

Offline pipelines and tests need data that needs no download and whose rewards can be
checked exactly: "What is 7 + 12?" -> "7 + 12 = 19. The answer is 19." For outcome and process reward
models (book ch.5) the same problems are also solved step by step (``solution_steps``), right or with a
wrong step, and labelled.
"""

from __future__ import annotations

import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_core.data.schemas import DatasetFormat

_OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
}
_ANSWER_RE = re.compile(r"The answer is[:\s]*(-?\d+)")
_INT_RE = re.compile(r"-?\d+")
_QUESTION_RE = re.compile(r"What is (.+)\?")


@dataclass(frozen=True)
class ArithmeticProblem:
    """One question with its exact integer answer."""

    question: str
    answer: int

    @property
    def expression(self) -> str:
        """The expression part of the question, e.g. ``"7 + 12"``."""
        return _QUESTION_RE.fullmatch(self.question).group(1)  # type: ignore[union-attr]


def generate_arithmetic(
    n: int,
    seed: int,
    *,
    max_operand: int = 20,
    operations: tuple[str, ...] = ("+", "-"),
) -> list[ArithmeticProblem]:
    """``n`` binary problems ``a op b`` with a, b in [0, max_operand]; same args, same output."""
    unknown = [op for op in operations if op not in _OPERATIONS]
    if unknown or not operations:
        raise ValueError(f"operations must be a non-empty subset of {list(_OPERATIONS)}, got {operations}")
    if max_operand < 0 or n < 0:
        raise ValueError(f"n and max_operand must be >= 0, got n={n}, max_operand={max_operand}")
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice(operations)
        problems.append(ArithmeticProblem(f"What is {a} {op} {b}?", _OPERATIONS[op](a, b)))
    return problems


def _solution_text(p: ArithmeticProblem, result: int) -> str:
    return f"{p.expression} = {result}. The answer is {result}."


def format_solution(p: ArithmeticProblem) -> str:
    """The reference solution, e.g. ``"7 + 12 = 19. The answer is 19."``."""
    return _solution_text(p, p.answer)


def extract_answer(text: str) -> int | None:
    """The integer after the last "The answer is", else the last integer in ``text``, else None."""
    if marked := _ANSWER_RE.findall(text):
        return int(marked[-1])
    if numbers := _INT_RE.findall(text):
        return int(numbers[-1])
    return None


def is_correct(text: str, answer: int | str) -> bool:
    """Whether the answer extracted from ``text`` equals ``answer``."""
    predicted = extract_answer(text)
    return predicted is not None and predicted == int(answer)


def to_sft_record(p: ArithmeticProblem) -> dict[str, Any]:
    """A one-turn chat: the question, then the reference solution."""
    return {
        "messages": [
            {"role": "user", "content": p.question},
            {"role": "assistant", "content": format_solution(p)},
        ]
    }


def to_prompt_record(p: ArithmeticProblem) -> dict[str, Any]:
    """The question as a prompt, with the answer kept for the verifier reward."""
    return {"prompt": p.question, "answer": str(p.answer)}


def to_preference_record(p: ArithmeticProblem, rng: random.Random) -> dict[str, Any]:
    """chosen y_c = the correct solution; rejected y_r = the same text with an answer off by 1..3."""
    offset = rng.choice([-3, -2, -1, 1, 2, 3])
    rejected = _solution_text(p, p.answer + offset)
    assert not is_correct(rejected, p.answer)  # the verifier must prefer chosen
    return {"prompt": p.question, "chosen": format_solution(p), "rejected": rejected}


def to_unpaired_record(p: ArithmeticProblem, rng: random.Random) -> dict[str, Any]:
    """One rated completion: the correct solution (label True) or a wrong one (False), at random."""
    pair = to_preference_record(p, rng)
    label = rng.random() < 0.5
    return {"prompt": p.question, "completion": pair["chosen"] if label else pair["rejected"], "label": label}


def solution_steps(p: ArithmeticProblem, error_at: int | None = None, offset: int = 0) -> list[str]:
    """A worked solution one step per item: the second operand split into tens and units, then the
    answer. ``error_at`` (0-based, a computing step) gets a result off by ``offset``; later steps compute
    correctly from the wrong value, so the final answer is wrong too.

    ``7 + 12`` -> ``["7 + 10 = 17", "17 + 2 = 19", "The answer is 19."]``; ``7 * 12`` -> ``["7 * 10 = 70",
    "7 * 2 = 14", "70 + 14 = 84", "The answer is 84."]``.
    """
    left, op, right = p.expression.split(" ")
    a, b = int(left), int(right)
    tens, units = b - b % 10, b % 10
    results: list[int] = []

    def step(x: int, symbol: str, y: int) -> str:
        value = _OPERATIONS[symbol](x, y) + (offset if len(results) == error_at else 0)
        results.append(value)
        return f"{x} {symbol} {y} = {value}"

    if op == "*":
        steps = [step(a, "*", tens), step(a, "*", units)]
        steps.append(step(results[0], "+", results[1]))
    else:
        steps = [step(a, op, tens)]
        steps.append(step(results[0], op, units))
    return [*steps, f"The answer is {results[-1]}."]


def _wrong_step(p: ArithmeticProblem, rng: random.Random) -> tuple[int, int]:
    """(index of a computing step to get wrong, offset of its result)."""
    computing = 3 if p.expression.split(" ")[1] == "*" else 2
    return rng.randrange(computing), rng.choice([-3, -2, -1, 1, 2, 3])


def to_outcome_records(p: ArithmeticProblem, rng: random.Random) -> list[dict[str, Any]]:
    """Two outcome rows of a problem: its worked solution (correct) and one with a wrong step (not)."""
    wrong = "\n".join(solution_steps(p, *_wrong_step(p, rng)))
    assert not is_correct(wrong, p.answer)
    return [
        {"prompt": p.question, "completion": "\n".join(solution_steps(p)), "correct": True},
        {"prompt": p.question, "completion": wrong, "correct": False},
    ]


def to_step_label_record(p: ArithmeticProblem, rng: random.Random) -> dict[str, Any]:
    """A worked solution with step labels: all good (+1), or, half the time, a wrong step from which on
    every step is bad (-1; the PRM800K ratings, so both binary and three-class heads can train on it)."""
    if rng.random() < 0.5:
        steps = solution_steps(p)
        return {"prompt": p.question, "steps": steps, "labels": [1] * len(steps)}
    error_at, offset = _wrong_step(p, rng)
    steps = solution_steps(p, error_at, offset)
    labels = [1 if i < error_at else -1 for i in range(len(steps))]
    return {"prompt": p.question, "steps": steps, "labels": labels}


def arithmetic_corpus(n: int, seed: int) -> list[str]:
    """Plain text lines (each question, then its solution) for training a tokenizer."""
    lines = []
    for p in generate_arithmetic(n, seed, operations=tuple(_OPERATIONS)):
        lines += [p.question, format_solution(p)]
    return lines


def arithmetic_records(fmt: DatasetFormat, n: int, seed: int, **kwargs: Any) -> list[dict]:
    """``n`` arithmetic rows in ``fmt``; ``kwargs`` go to :func:`generate_arithmetic`."""
    problems = generate_arithmetic(n, seed, **kwargs)
    if fmt == "sft":
        return [to_sft_record(p) for p in problems]
    if fmt == "prompts":
        return [to_prompt_record(p) for p in problems]
    if fmt == "preference":
        rng = random.Random(f"{seed}-preference")  # independent of the problem stream
        return [to_preference_record(p, rng) for p in problems]
    if fmt == "unpaired_preference":
        rng = random.Random(f"{seed}-unpaired")
        return [to_unpaired_record(p, rng) for p in problems]
    if fmt == "outcome":
        rng = random.Random(f"{seed}-outcome")
        return [row for p in problems for row in to_outcome_records(p, rng)]
    if fmt == "step_labels":
        rng = random.Random(f"{seed}-step-labels")
        return [to_step_label_record(p, rng) for p in problems]
    raise ValueError(
        f"unknown dataset format {fmt!r}; expected 'sft', 'preference', 'prompts', 'unpaired_preference', "
        "'outcome' or 'step_labels'"
    )


SYNTHETIC_TASKS: dict[str, Callable[..., list[dict]]] = {"arithmetic": arithmetic_records}


def synthetic_records(task: str, fmt: DatasetFormat, n: int, seed: int, **task_kwargs: Any) -> list[dict]:
    """Generate ``n`` rows of a registered synthetic ``task`` in format ``fmt``."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known tasks: {sorted(SYNTHETIC_TASKS)}")
    return SYNTHETIC_TASKS[task](fmt, n, seed, **task_kwargs)
