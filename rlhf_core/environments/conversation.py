"""Multi-turn environments without tools (book ch.13): a verifier that says "that is wrong, try again", and
a simulated user who asks follow-up questions.

- :class:`VerifierFeedback`: each answer is checked by a verifier (a built-in such as ``math_answer`` or
  ``arithmetic_exact``, or the user's own by reference); a correct one ends the episode, a wrong one gets
  the feedback message as the next user turn, until ``max_attempts`` answers were given. The episode's
  reward is the verifier's score of the last answer, minus ``attempt_penalty`` per extra attempt (so a
  policy is pushed to be right the first time). The model never sees the reference answer, only that
  its answer was wrong.
- :class:`UserSimulator`: follow-up user turns, from a column of the row (``followups``: a list of
  messages, asked in order; the data's own multi-turn questions, as MT-Bench's second turns) or from a
  user's function ``fn(messages, row) -> str | None`` (None ends the conversation; it may call a model).
  It gives no reward: the stage's reward sources score the final answer (or the whole conversation, in
  the row's ``messages``).

The first messages come from the row's ``prompt`` (a string: one user turn; a list: the conversation as
is), after an optional ``system_prompt``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlhf_core.environments.base import EpisodeStart, Message, StepResult
from rlhf_core.errors import UserError
from rlhf_core.rewards.scorers import verifier_function
from rlhf_core.rewards.user_functions import is_reference, load_function, parse_reference

DEFAULT_FEEDBACK = "That is not correct. Please try again."


def first_messages(row: dict, system_prompt: str | None) -> list[Message]:
    """The row's ``prompt`` as messages (a string is one user turn), after ``system_prompt`` unless the
    conversation already starts with a system message."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = [dict(m) for m in prompt]
    else:
        raise UserError(f"the prompt row has no usable 'prompt' (a string or a list of messages): {prompt!r}")
    if system_prompt and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


class VerifierFeedback:
    """Answer, be told whether it was right, try again (book ch.13's multi-turn with verifier feedback)."""

    def __init__(
        self,
        verifier: str = "math_answer",
        verifier_options: dict[str, Any] | None = None,
        max_attempts: int = 3,
        feedback: str = DEFAULT_FEEDBACK,
        attempt_penalty: float = 0.0,
        system_prompt: str | None = None,
    ) -> None:
        if max_attempts < 1:
            raise UserError(f"max_attempts must be at least 1, got {max_attempts}")
        if not feedback.strip():
            raise UserError("feedback must be a non-empty message")
        self.verify = verifier_function(verifier, verifier_options or {})
        self.max_attempts, self.feedback, self.penalty = max_attempts, feedback, attempt_penalty
        self.system_prompt = system_prompt
        self.row: dict = {}
        self.attempts = 0

    def reset(self, row: dict) -> EpisodeStart:
        self.row, self.attempts = row, 0
        return EpisodeStart(first_messages(row, self.system_prompt))

    def step(self, assistant: Message) -> StepResult:
        self.attempts += 1
        score = self.verify(assistant.get("content") or "", self.row)
        metrics = {"attempts": 1.0, "correct": float(score >= 1.0)}
        if score >= 1.0 or self.attempts >= self.max_attempts:
            reward = score - self.penalty * (self.attempts - 1)
            return StepResult(reward=reward, done=True, metrics=metrics)
        return StepResult([{"role": "user", "content": self.feedback}], metrics=metrics)


class UserSimulator:
    """Follow-up user turns from the row's ``followups`` column or from a function (book ch.13)."""

    def __init__(
        self,
        followups_column: str = "followups",
        function: str | None = None,
        max_user_turns: int = 4,
        system_prompt: str | None = None,
    ) -> None:
        self.column, self.max_user_turns, self.system_prompt = followups_column, max_user_turns, system_prompt
        self.next_turn: Callable[[list[Message], dict], str | None] | None = None
        if function is not None:
            if not is_reference(function):
                raise UserError(f"function {function!r}: expected 'file.py:function' or 'module:function'")
            self.next_turn = load_function(parse_reference(function))
        self.row: dict = {}
        self.messages: list[Message] = []
        self.asked = 0

    def reset(self, row: dict) -> EpisodeStart:
        self.row, self.asked = row, 0
        self.messages = first_messages(row, self.system_prompt)
        if self.next_turn is None and not isinstance(row.get(self.column, []), list):
            raise UserError(
                f"column {self.column!r} must be a list of follow-up messages, got {row[self.column]!r}"
            )
        return EpisodeStart(list(self.messages))

    def step(self, assistant: Message) -> StepResult:
        self.messages.append(assistant)
        reply = self._reply()
        if reply is None or self.asked >= self.max_user_turns:
            return StepResult(done=True)
        self.asked += 1
        message = {"role": "user", "content": reply}
        self.messages.append(message)
        return StepResult([message], metrics={"user_turns": 1.0})

    def _reply(self) -> str | None:
        if self.next_turn is not None:
            reply = self.next_turn(list(self.messages), self.row)
            if reply is not None and not isinstance(reply, str):
                raise TypeError(f"the user simulator returned {type(reply).__name__}, expected a str or None")
            return reply
        followups = self.row.get(self.column) or []
        if self.asked >= len(followups):
            return None
        item = followups[self.asked]
        return item["content"] if isinstance(item, dict) else str(item)
