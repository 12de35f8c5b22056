"""Task presets: public math and code datasets read in their own format, for SFT, RL and evaluation.

Verifiable rewards (RLVR, book ch.7) need the reference answer or the unit tests of each prompt next to
the prompt. A preset knows a dataset's standard column names and turns one of its rows into:

- a ``prompts`` row: every column of the source row, plus ``prompt`` and what the verifier reads
  (``answer`` and ``solution`` for math, ``tests`` and ``setup`` or ``entry_point`` for code);
- an ``sft`` row: the same, plus the reference solution as ``completion``.

So one file feeds SFT (its worked solutions), GRPO and evaluation (its answers and tests), and both
outputs hold the same rows in the same order: split with one seed, their splits line up.

=========  =====================================================  ======================================
preset     reads (role <- column)                                 writes
=========  =====================================================  ======================================
gsm8k      prompt <- question, answer <- answer ("... #### 72")   answer "72", solution; completion: the
                                                                  solution without <<48/2=24>> notes
math       prompt <- problem, answer <- solution (\\boxed{})       answer (last box's content), solution;
                                                                  completion: the solution
mbpp       prompt <- text, tests <- test_list, setup <-           prompt: text + the tests; tests, setup;
           test_setup_code (optional), completion <- code         completion: the code in a python fence
humaneval  prompt <- prompt (the stub), tests <- test,            prompt: instruction + stub; stub, tests,
           entry_point <- entry_point, completion <-              entry_point; completion: stub + body in
           canonical_solution                                     a python fence
=========  =====================================================  ======================================

A user's ``columns`` override single roles (``{prompt: question_text}``); a role's column may be a path
into a nested column (:mod:`rlhf_core.data.column_paths`). A row that cannot serve (no ``####`` line, no
``\\boxed{}``, an empty test list) is a :class:`~rlhf_core.data.schemas.DataValidationError` naming the
row and column, raised or collected as the stage's ``on_error`` says.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rlhf_core.data.column_paths import MissingColumn, column_value, path_steps
from rlhf_core.data.schemas import DataValidationError

TaskName = Literal["gsm8k", "math", "mbpp", "humaneval"]
PresetOutput = Literal["prompts", "sft"]


class RowProblem(Exception):
    """A source row a preset cannot use: the role whose column is wrong and what was expected."""

    def __init__(self, role: str, expected: str) -> None:
        super().__init__(expected)
        self.role, self.expected = role, expected


def _text(values: dict, role: str) -> str:
    value = values.get(role)
    if not isinstance(value, str) or not value.strip():
        raise RowProblem(role, f"a non-empty string, got {value!r:.80}")
    return value


_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")


def gsm8k_fields(values: dict) -> dict:
    """GSM8K: the final answer is what follows the last ``####`` of the worked solution."""
    question, solution = _text(values, "prompt"), _text(values, "answer")
    if "####" not in solution:
        raise RowProblem("answer", f"a solution ending in a line '#### <answer>', got {solution[-80:]!r}")
    final = solution.rsplit("####", 1)[1].strip()
    if not final:
        raise RowProblem("answer", "an answer after '####', got nothing")
    completion = _CALCULATOR_NOTE.sub("", solution)
    return {"prompt": question, "answer": final, "solution": solution, "completion": completion}


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if none."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i].strip()
    return None  # unbalanced


def math_fields(values: dict) -> dict:
    """MATH (Hendrycks et al.): the final answer is the last ``\\boxed{}`` of the solution."""
    problem, solution = _text(values, "prompt"), _text(values, "answer")
    final = last_boxed(solution)
    if not final:
        raise RowProblem("answer", f"a solution with a non-empty \\boxed{{<answer>}}, got {solution[-80:]!r}")
    return {"prompt": problem, "answer": final, "solution": solution, "completion": solution}


def _fenced(code: str) -> str:
    return "```python\n" + code.replace("\r\n", "\n").strip("\n") + "\n```"


def mbpp_fields(values: dict) -> dict:
    """MBPP (Austin et al. 2021): the task text and its asserts form the prompt, as in the paper's
    prompt (the asserts name the function to write)."""
    text, code = _text(values, "prompt"), _text(values, "completion")
    tests = values.get("tests")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise RowProblem("tests", f"a non-empty list of assert statements, got {tests!r:.80}")
    setup = values.get("setup") or ""
    if not isinstance(setup, str):
        raise RowProblem("setup", f"a string of code (or empty), got {setup!r:.80}")
    prompt = f"{text.strip()}\nYour code should pass these tests:\n\n" + "\n".join(tests)
    return {"prompt": prompt, "tests": tests, "setup": setup, "completion": _fenced(code)}


_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def humaneval_fields(values: dict) -> dict:
    """HumanEval (Chen et al. 2021): the stub is a signature and docstring, the solution its body, the
    test a program defining ``check(candidate)``."""
    stub, body, test = _text(values, "prompt"), _text(values, "completion"), _text(values, "tests")
    entry_point = _text(values, "entry_point").strip()
    if "def check" not in test:
        raise RowProblem("tests", f"a test program defining check(candidate), got {test[:80]!r}")
    if not _IDENTIFIER.fullmatch(entry_point):
        raise RowProblem("entry_point", f"a function name, got {entry_point!r}")
    prompt = "Complete the following Python function. Reply with the whole function.\n\n" + _fenced(stub)
    return {
        "prompt": prompt,
        "stub": stub,
        "tests": test,
        "entry_point": entry_point,
        "completion": _fenced(stub + body),
    }


@dataclass(frozen=True)
class TaskPreset:
    """A dataset's standard columns by role, and how one of its rows becomes prompt and sft fields."""

    columns: dict[str, str]  # role (our name) -> the dataset's column
    fields: Callable[[dict], dict]  # values by role -> the prompt's fields + "completion"
    optional: frozenset[str] = field(default_factory=frozenset)  # roles whose column may be absent


TASK_PRESETS: dict[str, TaskPreset] = {
    "gsm8k": TaskPreset({"prompt": "question", "answer": "answer"}, gsm8k_fields),
    "math": TaskPreset({"prompt": "problem", "answer": "solution"}, math_fields),
    "mbpp": TaskPreset(
        {"prompt": "text", "tests": "test_list", "setup": "test_setup_code", "completion": "code"},
        mbpp_fields,
        optional=frozenset({"setup"}),
    ),
    "humaneval": TaskPreset(
        {
            "prompt": "prompt",
            "tests": "test",
            "entry_point": "entry_point",
            "completion": "canonical_solution",
        },
        humaneval_fields,
    ),
}


def preset_columns(task: str, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The preset's role -> column map with the user's overrides; ValueError for an unknown role."""
    columns = dict(TASK_PRESETS[task].columns)
    unknown = sorted(set(overrides or {}) - set(columns))
    if unknown:
        raise ValueError(f"task {task!r} reads the columns {sorted(columns)}; got unknown {unknown}")
    return columns | dict(overrides or {})


def _check_columns(task: str, columns: dict[str, str], available: list[str], source: str) -> None:
    """Each role's column (or a nested path's first column) exists in the source, optional ones aside."""
    for role, column in columns.items():
        first = column if column in available else path_steps(column)[0]
        if first not in available and role not in TASK_PRESETS[task].optional:
            raise DataValidationError(
                source,
                f"column {column!r} (task {task!r} reads it as {role!r}); available columns: {available} "
                f"(set columns: {{{role}: <your column>}})",
                field=column,
            )


def _role_values(row: dict, columns: dict[str, str]) -> dict[str, Any]:
    values = {}
    for role, column in columns.items():
        try:
            values[role] = column_value(row, column)
        except MissingColumn:
            values[role] = None
    return values


def task_rows(
    rows: list[dict],
    task: str,
    *,
    source: str,
    columns: dict[str, str] | None = None,
    on_error: Literal["fail", "skip"] = "fail",
    available: list[str] | None = None,
) -> tuple[dict[PresetOutput, list[dict]], list[str]]:
    """The ``prompts`` and ``sft`` rows of a preset's source rows, and one problem line per rejected row.

    ``columns`` overrides single roles of the preset; ``available`` (the source's columns, default the
    first row's) is checked for each role's column first. A bad row raises :class:`DataValidationError`
    (``on_error="fail"``) or is dropped from both outputs and reported (``"skip"``).
    """
    role_columns = preset_columns(task, columns)
    _check_columns(task, role_columns, available or list(rows[0] if rows else {}), source)
    fields_of = TASK_PRESETS[task].fields
    prompts, sft, problems = [], [], []
    for i, row in enumerate(rows):
        try:
            fields = fields_of(_role_values(row, role_columns))
        except RowProblem as problem:
            error = DataValidationError(source, problem.expected, row=i, field=role_columns[problem.role])
            if on_error == "fail":
                raise error from None
            problems.append(str(error))
            continue
        completion = fields.pop("completion")
        prompts.append({**row, **fields})
        sft.append({**row, **fields, "completion": completion})
    return {"prompts": prompts, "sft": sft}, problems
