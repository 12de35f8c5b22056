"""``math_answer``: 1.0 when a completion's final answer equals the row's reference answer (book ch.7, RLVR).

Three steps per completion:

1. extract the final answer (:mod:`.answer_extraction`; ``extraction`` sets the conventions tried and
   their order; only the LAST ``\\boxed{}`` counts, and ``several_boxed="zero"`` scores 0 when a
   completion boxes several different answers);
2. take the reference from the row's ``answer_column``: GSM8K rows carry a worked solution ending in
   ``#### 72``, MATH rows a solution with ``\\boxed{...}``, other rows the bare answer
   (``answer_format="auto"`` tells them apart);
3. compare both with math-verify (``parse`` + ``verify``): 1/2 == 0.5 == \\frac12 == \\dfrac{1}{2},
   1,000 == 1000, "$18" == "18 dollars" == 18, -0 == 0, intervals and sets, equivalent expressions.

Step 3 runs in a shared pool of spawned worker processes (:mod:`.timed_process_pool`): sympy can take
minutes on a crafted expression (``10^{10^{10}}``), math-verify's own timeout needs a main thread, and
a trainer may call from any thread. A completion that overruns ``timeout_seconds`` scores 0 and counts
in ``timeouts``; one whose answer cannot be parsed (or crashes the parser) scores 0 and counts in
``parse_errors``. Metrics per completion: ``extracted``, ``correct``, ``timeouts``, ``parse_errors``.

Measured cost (2 CPU cores shared with other jobs, load average about 5; 2 workers; Python 3.11): pool
start-up plus the first completion 2.1 s (each worker imports sympy and math-verify once); afterwards
1.1-5.7 ms per completion over three 64-completion batches of distinct GSM8K/MATH-style answers
("#### 71", "\\boxed{\\frac{70}{71}}"), 0.07-0.37 s a batch. The pool is started on the first call,
so a trainer pays the start-up once, not per batch.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlhf_core.errors import UserError
from rlhf_core.rewards.reward_batch import RewardBatch
from rlhf_core.rewards.verifiers.answer_extraction import (
    ExtractionMethod,
    after_hashes,
    boxed_contents,
    extract_final_answer,
    last_boxed,
)
from rlhf_core.rewards.verifiers.timed_process_pool import shared_pool

POOL_NAME = "math_answer"


class MathAnswerOptions(BaseModel):
    """How ``math_answer`` finds and compares answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    answer_column: str = Field("answer", description="Row column holding the reference answer or solution.")
    answer_format: Literal["auto", "plain", "gsm8k", "boxed"] = Field(
        "auto",
        description="How the reference is written: 'gsm8k' a solution ending in '#### N', 'boxed' a "
        "solution with \\boxed{...} (the last one counts), 'plain' the bare answer; 'auto' picks per row, "
        "in that order.",
    )
    extraction: tuple[ExtractionMethod, ...] = Field(
        ("boxed", "hash", "answer_is", "last_number"),
        description="Answer conventions tried in the completion, in order; the first that finds one wins.",
    )
    fallback_to_last_number: bool = Field(
        True,
        description="Strictness: False drops 'last_number' from `extraction`, so a completion must state "
        "its answer (boxed, '####' or 'The answer is').",
    )
    several_boxed: Literal["last", "zero"] = Field(
        "last",
        description="A completion with several \\boxed{} of different content: 'last' grades the last box, "
        "'zero' scores 0 (no credit for listing guesses).",
    )
    percentages: Literal["either", "number", "fraction"] = Field(
        "either",
        description="What '50%' equals: 'either' 50 or 0.5 (math-verify's rule), 'number' only 50, "
        "'fraction' only 0.5. Applied to completion and reference alike.",
    )
    timeout_seconds: float = Field(
        5.0, gt=0, le=120, description="Seconds to parse and compare one completion; past it the score is 0."
    )
    float_rounding: int = Field(6, ge=0, le=15, description="Decimal places kept when comparing decimals.")
    max_answer_chars: int = Field(
        1000, ge=1, description="An extracted answer longer than this is not parsed (score 0, a parse error)."
    )

    @field_validator("extraction")
    @classmethod
    def _distinct_and_not_empty(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        if not methods or len(set(methods)) != len(methods):
            raise ValueError(f"extraction must list distinct methods, at least one; got {list(methods)}")
        return methods

    def methods(self) -> tuple[ExtractionMethod, ...]:
        """The extraction order in force (``fallback_to_last_number`` applied)."""
        if self.fallback_to_last_number:
            return self.extraction
        return tuple(method for method in self.extraction if method != "last_number")


def reference_answer(row: dict, row_index: int, options: MathAnswerOptions) -> str:
    """The reference answer's text from ``row[options.answer_column]``; UserError naming row and column."""
    column = options.answer_column
    if column not in row:
        raise UserError(
            f"math_answer: row {row_index} has no column '{column}' (its columns: {sorted(row)}); "
            f"set the option answer_column to the column holding the reference answer"
        )
    text = str(row[column]).strip()
    answer_format = options.answer_format
    if answer_format == "auto":
        has_box = "\\boxed" in text or "\\fbox" in text
        answer_format = "gsm8k" if "####" in text else "boxed" if has_box else "plain"
    answer = {"gsm8k": after_hashes, "boxed": last_boxed, "plain": lambda t: t or None}[answer_format](text)
    if answer is None:
        expected = {"gsm8k": "a line '#### <answer>'", "boxed": "a \\boxed{<answer>}", "plain": "an answer"}
        raise UserError(
            f"math_answer: row {row_index}, column '{column}' has no reference answer: expected "
            f"{expected[answer_format]} (option answer_format={options.answer_format!r}); got {text[:80]!r}"
        )
    return answer


_DELIMITERS = re.compile(r"^(?:\$+|\\\(|\\\[)(.*?)(?:\$+|\\\)|\\\])$", re.DOTALL)
# "$18", "\$1,000", "18 dollars", "72 \text{ apples}", "50 percent": a number with currency or words
_NUMBER_WITH_WORDS = re.compile(
    r"(?:\\?\$\s*)?(-?[\d,]*\.?\d+)\s*(\\?%|percent\b)?\s*(?:\\(?:text|mbox|mathrm)\{[^{}]*\}|[A-Za-z][A-Za-z\s.]*)?"
)
_PERCENT = re.compile(r"(-?[\d.]+)\s*\\%")


def answer_latex(answer: str, percentages: str) -> str:
    """An extracted answer as LaTeX math-verify can parse: delimiters, currency and unit words removed."""
    text = answer.strip().rstrip(".").strip()
    if delimited := _DELIMITERS.match(text):
        text = delimited.group(1).strip()
    if plain := _NUMBER_WITH_WORDS.fullmatch(text):
        text = plain.group(1) + ("\\%" if plain.group(2) else "")
    text = re.sub(r"(?<!\\)%", r"\\%", text)
    if percentages == "number":
        text = _PERCENT.sub(r"\1", text)
    elif percentages == "fraction":
        text = _PERCENT.sub(r"\\frac{\1}{100}", text)
    return text


@lru_cache(maxsize=1)
def _math_verify():
    """math-verify, imported in the worker (never in the caller's process), its timeout notice silenced."""
    import math_verify

    # we pass timeouts of None (the pool's timer bounds the whole task), which math-verify warns about
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


def _parse(latex: str) -> list:
    mv = _math_verify()
    return mv.parse("\\boxed{" + latex + "}", [mv.LatexExtractionConfig()], parsing_timeout=None)


@lru_cache(maxsize=1024)
def _parsed_reference(latex: str) -> list:
    return _parse(latex)  # a row's reference recurs for each of its sampled completions


def _same_text(left: str, right: str) -> bool:
    return " ".join(left.casefold().split()) == " ".join(right.casefold().split())


def compare_answers(answer: str, reference: str, float_rounding: int) -> tuple[bool, bool]:
    """(parsed, correct) for two answers already passed through :func:`answer_latex`; runs in a worker.

    A reference math-verify cannot parse (a word, a name) is compared as text instead.
    """
    gold = _parsed_reference(reference)
    prediction = _parse(answer)
    if not gold:
        return bool(prediction), _same_text(answer, reference)
    if not prediction:
        return False, False
    correct = _math_verify().verify(gold, prediction, float_rounding=float_rounding, timeout_seconds=None)
    return True, bool(correct)


def _completion_answer(completion: str, options: MathAnswerOptions) -> str | None:
    found = extract_final_answer(completion, options.methods())
    if found is None:
        return None
    method, answer = found
    if options.several_boxed == "zero" and method == "boxed":
        distinct_boxes = {" ".join(box.split()) for box in boxed_contents(completion)}
        if len(distinct_boxes) > 1:
            return ""  # found, but disqualified: several different boxed answers
    return answer


def math_answer(completions: list[str], rows: list[dict], options: MathAnswerOptions) -> RewardBatch:
    """1.0 where completion i's final answer equals rows[i]'s reference (math-verify), else 0.0."""
    if len(completions) != len(rows):
        raise ValueError(f"math_answer got {len(completions)} completions for {len(rows)} rows")
    references = [
        answer_latex(reference_answer(row, i, options), options.percentages) for i, row in enumerate(rows)
    ]
    answers = [_completion_answer(completion, options) for completion in completions]
    n = len(completions)
    extracted, correct, timeouts, parse_errors = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n
    to_compare = []
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        extracted[i] = 1.0
        if len(answer) > options.max_answer_chars:
            parse_errors[i] = 1.0
        elif answer:
            to_compare.append(i)
    calls = [
        (answer_latex(answers[i], options.percentages), references[i], options.float_rounding)
        for i in to_compare
    ]
    pool = shared_pool(POOL_NAME, preload=("math_verify",))
    for i, outcome in zip(to_compare, pool.map(compare_answers, calls, options.timeout_seconds), strict=True):
        if outcome.status == "timeout":
            timeouts[i] = 1.0
        elif outcome.status == "error" or not outcome.value[0]:
            parse_errors[i] = 1.0
        else:
            correct[i] = float(outcome.value[1])
    metrics = {"extracted": extracted, "correct": correct, "timeouts": timeouts, "parse_errors": parse_errors}
    return RewardBatch(scores=list(correct), metrics=metrics)
