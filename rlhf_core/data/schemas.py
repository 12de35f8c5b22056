"""Row schemas for the dataset formats and their validation.

- ``sft``, one of two shapes (a file may mix them; a row may not carry both):

  - ``messages``: a chat ending in an assistant turn;
  - ``prompt`` x + ``completion`` y (Alpaca-style question/answer columns, or TRL's conversational
    prompt-completion): x is a string or a list of messages ending in a user turn, y is a string or a
    list with one assistant message. Only y is trained (see :func:`sft_messages`).

  A column that is present but null counts as absent, so Parquet/Hub files mixing both shapes work.
  A ``messages`` chat may be a tool-use trajectory (book ch.13): assistant turns with ``tool_calls``,
  ``tool`` messages with the results, and an optional ``tools`` column of function declarations
  (shapes in :mod:`rlhf_core.data.tool_messages`).
- ``preference``: a prompt x, a ``chosen`` y_c and a ``rejected`` y_r, in one of the shapes of public
  preference data (TRL's dataset formats):

  - ``prompt`` a string, ``chosen``/``rejected`` strings;
  - conversational: ``prompt`` a list of messages ending in a user turn (multi-turn, an optional system
    message first), ``chosen``/``rejected`` strings or lists with one assistant message;
  - implicit prompt (HH-RLHF, UltraFeedback in TRL's format): ``chosen`` and ``rejected`` are whole
    conversations that differ only in their final assistant turn; x is the turns they share. A
    ``prompt`` column next to them (HuggingFaceH4/ultrafeedback_binarized) must agree with those turns.

  - trajectories (book ch.13, DPO on when to call a tool): whole conversations with tool use, sharing
    their turns up to a user turn (x), then each continuing with assistant turns (possibly calling
    tools) and tool results, ending in an assistant turn; an optional ``tools`` column.

  :func:`preference_parts` turns any shape but trajectories into (x as messages, y_c text, y_r text);
  :func:`rlhf_core.data.preference_trajectories.preference_trajectories` turns every shape into
  (x, y_c messages, y_r messages, tools).
- ``unpaired_preference`` (KTO, book ch.8): ``prompt`` x as above, one ``completion`` y (a string or
  one assistant message) and a ``label``: True/1 if y is desirable, False/0 if not (thumbs up/down).
  :func:`unpaired_parts` normalises a row.
- ``outcome`` (outcome reward models, book ch.5): ``prompt`` x as above, one ``completion`` y and
  ``correct``: True/1 if y's final answer is right, False/0 if not. :func:`outcome_parts` normalises it.
- ``step_labels`` (process reward models, book ch.5): ``prompt`` x, ``steps`` (a list of non-empty
  strings, the solution one step each) and ``labels`` (as many as steps): 0/1 (bad/good) or the PRM800K
  ratings -1/0/+1 (bad/neutral/good).
- ``prompts``: ``prompt`` x, optionally a reference ``answer`` (text, or a list of accepted answers)
  for verifiable rewards. Every other column (test cases, a schema, a rubric) is kept: reward
  functions and verifiers receive the whole row.
"""

from __future__ import annotations

import json
from typing import Any, Literal, NamedTuple

from rlhf_core.data.tool_messages import (
    check_assistant_calls,
    check_tool_message,
    check_tools_column,
    check_trajectory_pair,
    is_trajectory_pair,
    trajectory_prompt_length,
)
from rlhf_core.errors import UserError

DatasetFormat = Literal["sft", "preference", "prompts", "unpaired_preference", "outcome", "step_labels"]

# The column sets a file of each format may have: all columns of at least one set.
REQUIRED_COLUMNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "sft": (("messages",), ("prompt", "completion")),
    # without a prompt column, chosen and rejected are whole conversations (implicit prompt)
    "preference": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    "prompts": (("prompt",),),
    "unpaired_preference": (("prompt", "completion", "label"),),
    "outcome": (("prompt", "completion", "correct"),),
    "step_labels": (("prompt", "steps", "labels"),),
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


def _check_message(
    msg: Any, field: str, first: bool, with_tools: bool = False, previous: dict | None = None
) -> Problem | None:
    """Return (field, expected) for the first problem of one message, or None.

    ``with_tools``: ``tool`` messages and assistant ``tool_calls`` are allowed (``previous``: the message
    before, which a tool message must answer).
    """
    if not isinstance(msg, dict):
        return field, f"a dict with 'role' and 'content', got {type(msg).__name__}"
    roles = [*ROLES, "tool"] if with_tools else list(ROLES)
    if msg.get("role") not in roles:
        return f"{field}.role", f"one of {roles}, got {msg.get('role')!r}"
    if msg["role"] == "tool":
        return check_tool_message(msg, field, previous)
    if with_tools and msg["role"] == "assistant" and msg.get("tool_calls"):  # [] or null: no calls
        return check_assistant_calls(msg, field)
    if not _is_nonempty_str(msg.get("content")):
        return f"{field}.content", f"a non-empty string, got {msg.get('content')!r}"
    if msg["role"] == "system" and not first:
        return f"{field}.role", "a 'system' message only as the first message"
    return None


def _check_chat(messages: Any, column: str, last_role: str, with_tools: bool = False) -> Problem | None:
    """A non-empty list of messages whose last one is from ``last_role`` (tool use: ``with_tools``)."""
    if not isinstance(messages, list) or not messages:
        return column, f"a non-empty list of messages, got {messages!r}"
    for i, msg in enumerate(messages):
        previous = messages[i - 1] if i else None
        if (problem := _check_message(msg, f"{column}[{i}]", i == 0, with_tools, previous)) is not None:
            return problem
    if messages[-1]["role"] != last_role:
        field = f"{column}[{len(messages) - 1}].role"
        return field, f"the last message to be from {last_role!r}, got {messages[-1]['role']!r}"
    return None


def _check_prompt(prompt: Any, column: str = "prompt") -> Problem | None:
    """x: a non-empty string, or a list of messages ending in a user turn."""
    if isinstance(prompt, list):
        return _check_chat(prompt, column, last_role="user")
    if not _is_nonempty_str(prompt):
        return column, f"a non-empty string or a list of messages ending in a 'user' turn, got {prompt!r}"
    return None


def _check_reply(reply: Any, column: str) -> Problem | None:
    """y: a non-empty string, or a list with exactly one assistant message."""
    if isinstance(reply, list):
        if len(reply) != 1:
            return column, f"a list with exactly one 'assistant' message, got {len(reply)} messages"
        if (problem := _check_message(reply[0], f"{column}[0]", first=True)) is not None:
            return problem
        if reply[0]["role"] != "assistant":
            return f"{column}[0].role", f"'assistant', got {reply[0]['role']!r}"
        return None
    if not _is_nonempty_str(reply):
        return column, f"a non-empty string or a list with one 'assistant' message, got {reply!r}"
    return None


def _check_prompt_completion(row: dict) -> Problem | None:
    return _check_prompt(row.get("prompt")) or _check_reply(row.get("completion"), "completion")


def _check_sft(row: dict) -> Problem | None:
    if _has(row, "messages") and _has(row, "completion"):
        return None, "either 'messages' or 'prompt' + 'completion', not both (drop or rename one)"
    if _has(row, "completion") or (_has(row, "prompt") and not _has(row, "messages")):
        return _check_prompt_completion(row)
    if not _has(row, "messages"):
        return "messages", f"'messages' (a chat) or 'prompt' + 'completion', got columns {sorted(row)}"
    if _has(row, "tools") and (problem := check_tools_column(row["tools"])) is not None:
        return problem
    return _check_chat(row["messages"], "messages", last_role="assistant", with_tools=True)


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


def prompt_messages(prompt: str | list[dict]) -> list[dict]:
    """A valid prompt x as chat messages with role and content only; a plain string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def reply_text(reply: str | list[dict]) -> str:
    """The text of a valid completion y: the string itself, or the content of its one assistant message."""
    return reply if isinstance(reply, str) else reply[0]["content"]


def prompt_key(prompt: str | list[dict]) -> str:
    """A stable, hashable key for "the same prompt": the JSON of its messages (role and content).

    A plain prompt and the same text as one user turn share a key: they render as the same chat.
    """
    return json.dumps(prompt_messages(prompt), ensure_ascii=False, sort_keys=True)


class PreferenceParts(NamedTuple):
    """A preference pair whatever the row's shape."""

    prompt: list[dict]  # x as chat messages, ending in a user turn
    chosen: str  # y_c
    rejected: str  # y_r


def _is_conversation(value: Any) -> bool:
    """A whole conversation (implicit prompt) rather than one reply: a list of more than one message."""
    return isinstance(value, list) and len(value) > 1


_SHARED = "(the prompt is the turns 'chosen' and 'rejected' share)"


def _check_conversation(chat: Any, column: str) -> Problem | None:
    """A valid chat of at least a user turn followed by the final assistant turn."""
    if not isinstance(chat, list) or len(chat) < 2:
        got = f"{len(chat)} message(s)" if isinstance(chat, list) else repr(chat)
        return column, f"a whole conversation ending in a user then an assistant turn {_SHARED}, got {got}"
    if (problem := _check_chat(chat, column, last_role="assistant")) is not None:
        return problem
    if chat[-2]["role"] != "user":
        field = f"{column}[{len(chat) - 2}].role"
        return field, f"a 'user' turn before the final 'assistant' turn, got {chat[-2]['role']!r}"
    return None


def _first_difference(a: list[dict], b: list[dict]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _check_final_turns(chosen: Any, rejected: Any) -> Problem | None:
    """Conversations without tool use: identical except for their final (assistant) turn."""
    problem = _check_conversation(chosen, "chosen") or _check_conversation(rejected, "rejected")
    if problem is not None:
        return problem
    shared, other = prompt_messages(chosen[:-1]), prompt_messages(rejected[:-1])
    if shared != other:
        i = _first_difference(shared, other)
        return f"rejected[{i}]", f"the turn chosen[{i}]: only the final turns may differ {_SHARED}"
    return None


def _check_implicit_prompt(row: dict) -> Problem | None:
    """``chosen`` and ``rejected`` are whole conversations identical except for their final turn, or
    trajectories identical up to a user turn; a ``prompt`` column next to them must be those turns."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not _has(row, "prompt") and not isinstance(chosen, list):
        expected = "a non-empty string or a list of messages ending in a 'user' turn"
        return "prompt", f"{expected} (or whole conversations in 'chosen' and 'rejected'), got None"
    trajectories = is_trajectory_pair(chosen, rejected)
    check = _check_trajectories if trajectories else _check_final_turns
    if (problem := check(chosen, rejected)) is not None:
        return problem
    if _has(row, "prompt"):
        if (problem := _check_prompt(row["prompt"])) is not None:
            return problem
        x = chosen[: trajectory_prompt_length(chosen, rejected)] if trajectories else chosen[:-1]
        if prompt_messages(row["prompt"]) != prompt_messages(x):
            before = (
                "up to its last 'user' turn shared with 'rejected'"
                if trajectories
                else "before its final one"
            )
            return "prompt", f"the same turns as 'chosen' {before} {_SHARED}, got {row['prompt']!r}"
    return None


def _check_trajectories(chosen: list, rejected: list) -> Problem | None:
    """Whole conversations with tool use: each valid, then x and the continuations (``tool_messages``)."""
    return (
        _check_chat(chosen, "chosen", last_role="assistant", with_tools=True)
        or _check_chat(rejected, "rejected", last_role="assistant", with_tools=True)
        or check_trajectory_pair(chosen, rejected)
    )


def _check_preference(row: dict) -> Problem | None:
    if _has(row, "tools") and (problem := check_tools_column(row["tools"])) is not None:
        return problem
    if _is_conversation(row.get("chosen")) or not _has(row, "prompt"):
        problem = _check_implicit_prompt(row)
    else:
        problem = (
            _check_prompt(row["prompt"])
            or _check_reply(row.get("chosen"), "chosen")
            or _check_reply(row.get("rejected"), "rejected")
        )
    if problem is not None or is_trajectory_pair(row["chosen"], row["rejected"]):
        return problem  # identical trajectories are found by check_trajectory_pair
    if (parts := preference_parts(row)).chosen.strip() == parts.rejected.strip():
        return "rejected", "a response different from 'chosen' (they are identical)"
    return None


def preference_parts(row: dict) -> PreferenceParts:
    """(x as messages, y_c, y_r) of a valid ``preference`` row of any shape.

    A plain prompt becomes one user turn and a reply given as one assistant message its text; whole
    conversations (implicit prompt) give their shared turns as x and their final turns as y_c and y_r.
    A pair of tool-use trajectories has no such text form: it raises :class:`UserError` (read it with
    ``preference_trajectories``).
    """
    chosen, rejected = row["chosen"], row["rejected"]
    if is_trajectory_pair(chosen, rejected):
        raise UserError(
            "this preference row is a pair of tool-use trajectories, which has no (prompt, chosen text, "
            "rejected text) form; read it with rlhf_core.data.preference_trajectories"
        )
    if _is_conversation(chosen):
        return PreferenceParts(prompt_messages(chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"])
    return PreferenceParts(prompt_messages(row["prompt"]), reply_text(chosen), reply_text(rejected))


class UnpairedParts(NamedTuple):
    """One rated completion (KTO's unpaired data) whatever the row's shape."""

    prompt: list[dict]  # x as chat messages, ending in a user turn
    completion: str  # y
    label: bool  # True: y is desirable; False: undesirable


def _check_label(label: Any) -> Problem | None:
    if isinstance(label, bool) or (type(label) is int and label in (0, 1)):
        return None
    return "label", f"true or false (is the completion desirable?), or 1 or 0, got {label!r}"


def _check_unpaired(row: dict) -> Problem | None:
    return (
        _check_prompt(row.get("prompt"))
        or _check_reply(row.get("completion"), "completion")
        or _check_label(row.get("label"))
    )


def unpaired_parts(row: dict) -> UnpairedParts:
    """(x as messages, y, desirable) of a valid ``unpaired_preference`` row; a 0/1 label becomes a bool."""
    return UnpairedParts(prompt_messages(row["prompt"]), reply_text(row["completion"]), bool(row["label"]))


class OutcomeParts(NamedTuple):
    """An outcome row whatever its shape."""

    prompt: list[dict]  # x as chat messages
    completion: str  # y
    correct: bool  # r: is y's final answer right


def _check_correct(value: Any) -> Problem | None:
    if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
        return None
    return "correct", f"true or false (is the completion's answer right?), or 1 or 0, got {value!r}"


def _check_outcome(row: dict) -> Problem | None:
    return (
        _check_prompt(row.get("prompt"))
        or _check_reply(row.get("completion"), "completion")
        or _check_correct(row.get("correct"))
    )


def outcome_parts(row: dict) -> OutcomeParts:
    """(x as messages, y, correct) of a valid ``outcome`` row; a 0/1 label becomes a bool."""
    return OutcomeParts(prompt_messages(row["prompt"]), reply_text(row["completion"]), bool(row["correct"]))


STEP_LABEL_VALUES = (-1, 0, 1)


def _check_step_labels(row: dict) -> Problem | None:
    if (problem := _check_prompt(row.get("prompt"))) is not None:
        return problem
    steps, labels = row.get("steps"), row.get("labels")
    if not isinstance(steps, list) or not steps:
        return "steps", f"a non-empty list of strings (one per solution step), got {steps!r:.80}"
    for i, step in enumerate(steps):
        if not _is_nonempty_str(step):
            return f"steps[{i}]", f"a non-empty string, got {step!r:.80}"
    if not isinstance(labels, list):
        return "labels", f"a list with one label per step, got {labels!r:.80}"
    if len(labels) != len(steps):
        return "labels", f"one label per step: {len(steps)} steps but {len(labels)} labels"
    for i, label in enumerate(labels):
        if type(label) is not int or label not in STEP_LABEL_VALUES:
            return f"labels[{i}]", f"0 or 1 (bad/good), or -1, 0, +1 (bad/neutral/good), got {label!r}"
    return None


def _check_prompts(row: dict) -> Problem | None:
    if not _is_nonempty_str(row.get("prompt")):
        return "prompt", f"a non-empty string, got {row.get('prompt')!r}"
    if _has(row, "answer") and not _is_answer(row["answer"]):  # null: no answer, as if absent
        return "answer", f"a string or a list of strings when present, got {row['answer']!r:.80}"
    return None


def _is_answer(value: Any) -> bool:
    """A reference answer: text, or a non-empty list of acceptable answers (aliases) as text."""
    if isinstance(value, list):
        return bool(value) and all(isinstance(item, str) for item in value)
    return isinstance(value, str)


_CHECKS = {
    "sft": _check_sft,
    "preference": _check_preference,
    "prompts": _check_prompts,
    "unpaired_preference": _check_unpaired,
    "outcome": _check_outcome,
    "step_labels": _check_step_labels,
}


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
