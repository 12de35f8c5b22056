"""Row schemas for the three dataset formats and their validation.

- ``sft``, one of two shapes (a file may mix them; a row may not carry both):

  - ``messages``: a chat ending in an assistant turn;
  - ``prompt`` x + ``completion`` y (Alpaca-style question/answer columns, or TRL's conversational
    prompt-completion): x is a string or a list of messages ending in a user turn, y is a string or a
    list with one assistant message. Only y is trained (see :func:`sft_messages`).

  A column that is present but null counts as absent, so Parquet/Hub files mixing both shapes work.
- ``preference``: ``prompt`` x, ``chosen`` y_c, ``rejected`` y_r.
- ``prompts``: ``prompt`` x, optionally a reference ``answer`` for verifiable rewards.
"""

from __future__ import annotations

from typing import Any, Literal

from rlhf_core.errors import UserError

DatasetFormat = Literal["sft", "preference", "prompts"]

# The column sets a file of each format may have: all columns of at least one set.
REQUIRED_COLUMNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "sft": (("messages",), ("prompt", "completion")),
    "preference": (("prompt", "chosen", "rejected"),),
    "prompts": (("prompt",),),
}

ROLES = ("system", "user", "assistant")

Problem = tuple[str | None, str]  # (field, what was expected); field None for the row as a whole


class DataValidationError(UserError):
    """A dataset row (or a line of a file) does not match its declared format.

    The message names the source, the row (or line) and the field, and says what was expected.
    """

    def __init__(
        self,
        source: str,
        expected: str,
        *,
        row: int | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        where = [f"in {source}"]
        where += [f"line {line}"] if line is not None else []
        where += [f"row {row} (0-based)"] if row is not None else []
        where += [f"field {field!r}"] if field is not None else []
        super().__init__(f"{', '.join(where)}: expected {expected}")
        self.source, self.expected = source, expected
        self.row, self.field, self.line = row, field, line


def _is_nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _has(row: dict, column: str) -> bool:
    return row.get(column) is not None


def _check_message(msg: Any, field: str, first: bool) -> Problem | None:
    """Return (field, expected) for the first problem of one message, or None."""
    if not isinstance(msg, dict):
        return field, f"a dict with 'role' and 'content', got {type(msg).__name__}"
    if msg.get("role") not in ROLES:
        return f"{field}.role", f"one of {list(ROLES)}, got {msg.get('role')!r}"
    if not _is_nonempty_str(msg.get("content")):
        return f"{field}.content", f"a non-empty string, got {msg.get('content')!r}"
    if msg["role"] == "system" and not first:
        return f"{field}.role", "a 'system' message only as the first message"
    return None


def _check_chat(messages: Any, column: str, last_role: str) -> Problem | None:
    """A non-empty list of messages whose last one is from ``last_role``."""
    if not isinstance(messages, list) or not messages:
        return column, f"a non-empty list of messages, got {messages!r}"
    for i, msg in enumerate(messages):
        if (problem := _check_message(msg, f"{column}[{i}]", first=i == 0)) is not None:
            return problem
    if messages[-1]["role"] != last_role:
        field = f"{column}[{len(messages) - 1}].role"
        return field, f"the last message to be from {last_role!r}, got {messages[-1]['role']!r}"
    return None


def _check_prompt_completion(row: dict) -> Problem | None:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list):
        if (problem := _check_chat(prompt, "prompt", last_role="user")) is not None:
            return problem
    elif not _is_nonempty_str(prompt):
        return "prompt", f"a non-empty string or a list of messages ending in a 'user' turn, got {prompt!r}"
    if isinstance(completion, list):
        if len(completion) != 1:
            n = len(completion)
            return "completion", f"a list with exactly one 'assistant' message, got {n} messages"
        if (problem := _check_message(completion[0], "completion[0]", first=True)) is not None:
            return problem
        if completion[0]["role"] != "assistant":
            return "completion[0].role", f"'assistant', got {completion[0]['role']!r}"
    elif not _is_nonempty_str(completion):
        return "completion", f"a non-empty string or a list with one 'assistant' message, got {completion!r}"
    return None


def _check_sft(row: dict) -> Problem | None:
    if _has(row, "messages") and _has(row, "completion"):
        return None, "either 'messages' or 'prompt' + 'completion', not both (drop or rename one)"
    if _has(row, "completion") or (_has(row, "prompt") and not _has(row, "messages")):
        return _check_prompt_completion(row)
    if not _has(row, "messages"):
        return "messages", f"'messages' (a chat) or 'prompt' + 'completion', got columns {sorted(row)}"
    return _check_chat(row["messages"], "messages", last_role="assistant")


def sft_messages(row: dict) -> tuple[list[dict], bool]:
    """The conversation of a valid ``sft`` row, and whether to train its final turn only.

    A ``messages`` row is its own conversation (False: the ``mask`` setting decides). A prompt/completion
    row becomes prompt + [completion] (a plain prompt is one user turn, a plain completion one assistant
    turn); True: only the completion is trained, never an assistant turn inside the prompt.
    """
    if not _has(row, "completion"):
        return row["messages"], False
    prompt, completion = row["prompt"], row["completion"]
    context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    reply = {"role": "assistant", "content": completion} if isinstance(completion, str) else completion[0]
    return [*context, reply], True


def _check_preference(row: dict) -> Problem | None:
    for field in ("prompt", "chosen", "rejected"):
        if not _is_nonempty_str(row.get(field)):
            return field, f"a non-empty string, got {row.get(field)!r}"
    if row["chosen"] == row["rejected"]:
        return "rejected", "a response different from 'chosen' (they are identical)"
    return None


def _check_prompts(row: dict) -> Problem | None:
    if not _is_nonempty_str(row.get("prompt")):
        return "prompt", f"a non-empty string, got {row.get('prompt')!r}"
    if "answer" in row and not isinstance(row["answer"], str):
        return "answer", f"a string when present, got {type(row['answer']).__name__}"
    return None


_CHECKS = {"sft": _check_sft, "preference": _check_preference, "prompts": _check_prompts}


def validate_records(
    records: list[dict],
    fmt: DatasetFormat,
    *,
    source: str,
    on_error: Literal["fail", "skip"] = "fail",
) -> tuple[list[dict], list[str]]:
    """Check every row against ``fmt``; return (valid rows, problem messages).

    ``on_error="fail"`` raises :class:`DataValidationError` on the first bad row;
    ``"skip"`` drops bad rows and reports each one in ``problems``. Extra columns are kept.
    """
    if fmt not in _CHECKS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {sorted(_CHECKS)}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    valid, problems = [], []
    for i, row in enumerate(records):
        problem = (None, "a JSON object (dict)") if not isinstance(row, dict) else _CHECKS[fmt](row)
        if problem is None:
            valid.append(row)
            continue
        error = DataValidationError(source, problem[1], row=i, field=problem[0])
        if on_error == "fail":
            raise error
        problems.append(str(error))
    return valid, problems
