"""Finding the final answer in a math completion or a reference solution (book ch.7, verifiable rewards).

A completion states its answer in one of a few conventions; each has a finder that returns the answer's
text or None:

- ``boxed``: the content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched, nesting
  allowed. Only the last counts: math-verify on the whole text would merge ``\\boxed{1} \\boxed{2}
  \\boxed{3}`` into the set {1, 2, 3}, which could match a set-valued reference by listing guesses.
  :func:`boxed_contents` gives all of them for callers that reject several distinct boxes;
- ``hash``: the text after the last ``####`` on its line (GSM8K's convention);
- ``answer_is``: the text after the last "answer is" / "answer:", up to the end of the line or sentence;
- ``last_number``: the last number in the text (a loose fallback: "... so 3 + 4 = 7" gives 7).

Every finder is linear in the text's length (one regex pass or one brace-matching pass), so an
adversarial completion cannot make extraction itself slow.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Literal

ExtractionMethod = Literal["boxed", "hash", "answer_is", "last_number"]

_BOX_OPENING = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
_HASH_ANSWER = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"\banswer\s*(?:is\b|:)\s*:?[ \t]*([^\n]*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?%?")


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each ``{`` -> position of its ``}``, in one pass; unclosed braces are left out."""
    closing: dict[int, int] = {}
    open_positions: list[int] = []
    for position, character in enumerate(text):
        if character == "{" and (position == 0 or text[position - 1] != "\\"):
            open_positions.append(position)
        elif character == "}" and open_positions and text[position - 1] != "\\":
            closing[open_positions.pop()] = position
    return closing


def boxed_contents(text: str) -> list[str]:
    """The content of every well-formed ``\\boxed{...}`` / ``\\fbox{...}`` (and ``\\boxed 5``), in order."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return []
    closing = _matching_braces(text)
    found = []
    for match in _BOX_OPENING.finditer(text):
        if match.group(1):  # \boxed{...}
            end = closing.get(match.start(1))
            if end is not None:
                found.append(text[match.start(1) + 1 : end].strip())
        else:  # \boxed 5: the next token
            token = re.match(r"[^\s$]+", text[match.end() :])
            if token:
                found.append(token.group(0))
    return [content for content in found if content]


def last_boxed(text: str) -> str | None:
    """The content of the last well-formed box, or None."""
    contents = boxed_contents(text)
    return contents[-1] if contents else None


def after_hashes(text: str) -> str | None:
    """GSM8K's ``#### 72``: the rest of the line after the last ``####`` that has text."""
    answers = [match.group(1).strip() for match in _HASH_ANSWER.finditer(text)]
    answers = [answer for answer in answers if answer]
    return answers[-1] if answers else None


def after_answer_is(text: str) -> str | None:
    """ "The answer is 42." / "Final answer: $\\frac12$": the last such statement, to the sentence's end."""
    answers = []
    for match in _ANSWER_IS.finditer(text):
        answer = _SENTENCE_END.split(match.group(1), maxsplit=1)[0].strip()
        if answer:
            answers.append(answer)
    return answers[-1] if answers else None


def last_number(text: str) -> str | None:
    """The last number: integer, decimal, thousands-separated, a fraction a/b, or a percentage."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


FINDERS: dict[ExtractionMethod, Callable[[str], str | None]] = {
    "boxed": last_boxed,
    "hash": after_hashes,
    "answer_is": after_answer_is,
    "last_number": last_number,
}


def extract_final_answer(
    text: str, methods: Sequence[ExtractionMethod]
) -> tuple[ExtractionMethod, str] | None:
    """The first method in ``methods`` that finds an answer, and that answer's text; None if none does."""
    for method in methods:
        answer = FINDERS[method](text)
        if answer is not None:
            return method, answer
    return None
