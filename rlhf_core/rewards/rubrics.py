"""Rubric rewards: a judge checks a response against each item of its prompt's rubric (book ch.12,
"Rubrics"; Gunjal et al. 2025, Rubrics as Rewards).

A rubric is a list of items, each a criterion with a weight: given directly (``{criterion, weight}``) or
by category (``{criterion, category}``), the category mapped to a weight. The book's categories are
Essential / Important / Optional (weights 1-5) and Pitfall (-1 or -2); the mapping is the caller's
(``DEFAULT_CATEGORY_WEIGHTS`` is our choice within those ranges). The judge answers per item whether the
response satisfies it, and the reward is

    r(x, y) = sum_i w_i * 1[y satisfies item i] / sum_{i: w_i > 0} w_i

so a response meeting every positive item and no pitfall scores 1. A pitfall is a criterion describing
a mistake (e.g. "States that the sky is green."): satisfying it adds its negative weight. Pitfalls can
make the sum negative, down to -sum_{w_i<0}|w_i| / sum_{w_i>0} w_i; ``clip=True`` clips r to [0, 1].

The judge is any ``prompts -> answers`` function (an endpoint, a policy model); each answer must end with
``[[YES]]`` or ``[[NO]]``. An answer without one makes its row's score NaN (``on_unparseable='skip'``:
the stage's rule for an invalid reward then drops the row and counts it) or raises naming the row and
the criterion (``'fail'``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rlhf_core.errors import UserError

# Our choice within the book's ranges (Essential/Important/Optional 1-5, Pitfall -1 or -2).
DEFAULT_CATEGORY_WEIGHTS: dict[str, float] = {
    "essential": 5.0,
    "important": 3.0,
    "optional": 1.0,
    "pitfall": -1.0,
}
SATISFIED = re.compile(r"\[\[\s*(YES|NO)\s*\]\]", re.IGNORECASE)

GenerateFn = Callable[[list[str]], list[str]]  # judge prompts -> judge answers, in order
RubricScorer = Callable[[list[tuple[str, str]], list[dict]], list[float]]  # (pairs, their rows) -> r


class RubricError(UserError):
    """A rubric cell that is not a list of weighted criteria."""


class RubricJudgeParseError(UserError):
    """A judge answer without [[YES]] or [[NO]], and the rubric is set to fail on it."""


@dataclass(frozen=True)
class RubricItem:
    criterion: str
    weight: float


def parse_rubric(cell: object, category_weights: Mapping[str, float], where: str) -> list[RubricItem]:
    """The items of one rubric cell (a list, or its JSON text) of ``{criterion, weight}`` or
    ``{criterion, category}`` (extra keys such as ``reasoning`` are ignored); RubricError naming ``where``
    (stage, row, column) and the item otherwise. At least one item must have a positive weight."""
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError as exc:
            raise RubricError(f"{where}: the rubric is text but not JSON ({exc})") from None
    if not isinstance(cell, list) or not cell:
        raise RubricError(f"{where}: expected a non-empty list of rubric items, got {cell!r:.120}")
    items = [_parse_item(item, category_weights, f"{where}, item {i}") for i, item in enumerate(cell)]
    if not any(item.weight > 0 for item in items):
        raise RubricError(f"{where}: no item has a positive weight, so the score has no denominator")
    return items


def _parse_item(item: object, category_weights: Mapping[str, float], where: str) -> RubricItem:
    if not isinstance(item, dict) or not isinstance(item.get("criterion"), str) or not item["criterion"]:
        raise RubricError(f"{where}: expected {{criterion: text, weight or category}}, got {item!r:.120}")
    if ("weight" in item) == ("category" in item):
        raise RubricError(f"{where}: give exactly one of weight or category, got {sorted(item)}")
    if "category" in item:
        category = str(item["category"]).lower()
        if category not in category_weights:
            raise RubricError(
                f"{where}: unknown category {item['category']!r}; known: {', '.join(category_weights)}"
            )
        return RubricItem(item["criterion"], float(category_weights[category]))
    weight = item["weight"]
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise RubricError(f"{where}: weight must be a finite number, got {weight!r}")
    return RubricItem(item["criterion"], float(weight))


def rubric_item_prompt(question: str, response: str, criterion: str) -> str:
    """The judge's question about one item (template ``rubric-item-v1``)."""
    return (
        "You are an impartial judge. Decide whether the response to the user's question satisfies the "
        f"criterion.\n\n[Question]\n{question}\n\n[Response]\n{response}\n\n[Criterion]\n{criterion}\n\n"
        "Explain briefly, then end with [[YES]] if the response satisfies the criterion, else [[NO]]."
    )


def parse_satisfied(answer: str) -> bool | None:
    """True for a last [[YES]], False for a last [[NO]], None when the answer has neither."""
    found = SATISFIED.findall(answer)
    return found[-1].upper() == "YES" if found else None


def rubric_score(items: list[RubricItem], satisfied: list[bool], *, clip: bool) -> float:
    """sum_i w_i * 1[satisfied_i] / sum_{i: w_i > 0} w_i, clipped to [0, 1] when ``clip``."""
    total = sum(item.weight for item in items if item.weight > 0)
    score = sum(item.weight for item, ok in zip(items, satisfied, strict=True) if ok) / total
    return min(1.0, max(0.0, score)) if clip else score


def score_rubrics(
    pairs: list[tuple[str, str]],
    rows: list[dict],
    judge: GenerateFn,
    *,
    column: str,
    category_weights: Mapping[str, float],
    clip: bool,
    on_unparseable: str,
    what: str,
) -> list[float]:
    """The rubric reward of each (prompt, completion), its items read from ``rows[i][column]``; the judge
    is asked about every item of every row in one call. ``what`` names the stage and source in errors."""
    rubrics = [
        parse_rubric(row.get(column), category_weights, f"{what}, row {i} (0-based), column '{column}'")
        for i, row in enumerate(rows)
    ]
    prompts = [
        rubric_item_prompt(question, response, item.criterion)
        for (question, response), items in zip(pairs, rubrics, strict=True)
        for item in items
    ]
    answers = judge(prompts)
    scores, start = [], 0
    for i, items in enumerate(rubrics):
        row_answers, start = answers[start : start + len(items)], start + len(items)
        verdicts = [(item, a, parse_satisfied(a)) for item, a in zip(items, row_answers, strict=True)]
        missing = [(item, answer) for item, answer, ok in verdicts if ok is None]
        if missing and on_unparseable == "fail":
            item, answer = missing[0]
            raise RubricJudgeParseError(
                f"{what}, row {i} (0-based): no [[YES]] or [[NO]] in the judge's answer about criterion "
                f"{item.criterion!r}: {answer[:120]!r} (set on_unparseable: skip to drop such rows)"
            )
        scores.append(
            math.nan if missing else rubric_score(items, [bool(ok) for *_, ok in verdicts], clip=clip)
        )
    return scores
