"""Column paths: naming a value inside a nested or list column of a row.

A column map (ours -> theirs) names "theirs" as a top-level column (``question``) or as a path into
one: keys of a nested object are joined by dots and list items indexed in brackets, so
``answers.text[0]`` is ``row["answers"]["text"][0]`` (SQuAD's answers) and ``messages[0].content``
the first message's text. A top-level name is tried first, so a column whose own name holds a dot
(``meta.answer`` as one Parquet column) is read as that column.
"""

from __future__ import annotations

import re
from typing import Any

_STEP = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")


class MissingColumn(KeyError):
    """A path step that does not exist in a row; ``expected`` says which and what was there."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def path_steps(path: str) -> list[str | int]:
    """``"answers.text[0]"`` -> ``["answers", "text", 0]``; ValueError for a malformed path."""
    steps: list[str | int] = []
    position = 0
    for match in _STEP.finditer(path):
        between = path[position : match.start()]
        if between not in ("", "."):
            raise ValueError(f"malformed column path {path!r} at {between!r}")
        key, index = match.groups()
        steps.append(int(index) if index is not None else key)
        position = match.end()
    if not steps or path[position:] or path.startswith(("[", ".")):
        raise ValueError(f"malformed column path {path!r}: expected e.g. 'question', 'answers.text[0]'")
    return steps


def is_nested(path: str) -> bool:
    """Whether ``path`` reaches inside a column (a dot or a bracket) rather than naming one."""
    return "." in path or "[" in path


def column_value(row: dict, path: str) -> Any:
    """The value ``path`` names in ``row``; :class:`MissingColumn` when a step is absent."""
    if path in row:
        return row[path]
    value: Any = row
    walked = ""
    for step in path_steps(path):
        if isinstance(step, int):
            if not isinstance(value, list) or not -len(value) <= step < len(value):
                size = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
                raise MissingColumn(f"item [{step}] of {walked or 'the row'!r}, which is {size}")
            value = value[step]
            walked += f"[{step}]"
            continue
        if not isinstance(value, dict) or step not in value:
            keys = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise MissingColumn(f"key {step!r} in {walked or 'the row'!r} (it has: {keys})")
        value = value[step]
        walked += f".{step}" if walked else step
    return value
