"""Row schemas for the three dataset formats and their validation.

- ``sft``: ``messages``, a chat ending in an assistant turn.
- ``preference``: ``prompt`` x, ``chosen`` y_c, ``rejected`` y_r.
- ``prompts``: ``prompt`` x, optionally a reference ``answer`` for verifiable rewards.
"""

from __future__ import annotations

from typing import Any, Literal

DatasetFormat = Literal["sft", "preference", "prompts"]

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "prompts": ("prompt",),
}

ROLES = ("system", "user", "assistant")


class DataValidationError(ValueError):
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


def _check_message(msg: Any, i: int, n: int) -> tuple[str, str] | None:
    """Return (field, expected) for the first problem in message ``i`` of ``n``, or None."""
    field = f"messages[{i}]"
    if not isinstance(msg, dict):
        return field, f"a dict with 'role' and 'content', got {type(msg).__name__}"
    if msg.get("role") not in ROLES:
        return f"{field}.role", f"one of {list(ROLES)}, got {msg.get('role')!r}"
    if not _is_nonempty_str(msg.get("content")):
        return f"{field}.content", f"a non-empty string, got {msg.get('content')!r}"
    if msg["role"] == "system" and i != 0:
        return f"{field}.role", "a 'system' message only as the first message"
    if i == n - 1 and msg["role"] != "assistant":
        return f"{field}.role", f"the last message to be from 'assistant', got {msg['role']!r}"
    return None


def _check_sft(row: dict) -> tuple[str, str] | None:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages", f"a non-empty list of messages, got {messages!r}"
    for i, msg in enumerate(messages):
        if (problem := _check_message(msg, i, len(messages))) is not None:
            return problem
    return None  # the last message is an assistant turn, so there is at least one


def _check_preference(row: dict) -> tuple[str, str] | None:
    for field in ("prompt", "chosen", "rejected"):
        if not _is_nonempty_str(row.get(field)):
            return field, f"a non-empty string, got {row.get(field)!r}"
    if row["chosen"] == row["rejected"]:
        return "rejected", "a response different from 'chosen' (they are identical)"
    return None


def _check_prompts(row: dict) -> tuple[str, str] | None:
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
