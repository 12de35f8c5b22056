"""Rubric rewards (book ch.12): r = sum_i w_i * 1[satisfied_i] / sum_{i: w_i > 0} w_i, with hand-worked
values, pitfalls, clipping, unparseable judge answers, refusals of bad rubrics and specs, a judge behind a
real HTTP server (cached), and a tiny policy model as judge."""

from __future__ import annotations

import math
import re

import pytest
from pydantic import ValidationError
from scripted_chat_server import scripted_chat_server

from rlhf_core.judging.rubric_judges import policy_rubric_judge, rubric_scorer, rubric_scorers
from rlhf_core.judging.verdict_cache import VerdictCache
from rlhf_core.modeling.models import build_tiny_model
from rlhf_core.rewards.rubrics import (
    DEFAULT_CATEGORY_WEIGHTS,
    RubricError,
    RubricItem,
    RubricJudgeParseError,
    parse_rubric,
    rubric_score,
    score_rubrics,
)
from rlhf_core.spec import TinyModelSource
from rlhf_core.spec.rubrics import RubricSpec

# essential 5, important 3, optional 1, pitfall -1: the positive weights sum to W = 9
RUBRIC = [
    {"criterion": "Gives the answer 5.", "category": "essential"},
    {"criterion": "Shows the addition.", "category": "important"},
    {"criterion": "Is polite.", "category": "Optional"},
    {"criterion": "Claims that 2 + 3 is 6.", "category": "pitfall"},
]
ITEMS = parse_rubric(RUBRIC, DEFAULT_CATEGORY_WEIGHTS, "test")
CRITERION = re.compile(r"\[Criterion\]\n(.*?)\n\n", re.DOTALL)
RESPONSE = re.compile(r"\[Response\]\n(.*?)\n\n\[Criterion\]", re.DOTALL)


@pytest.mark.parametrize(
    ("satisfied", "clipped", "raw"),
    [
        ([True, True, True, False], 1.0, 9 / 9),  # every positive item, no pitfall
        ([True, False, False, False], 5 / 9, 5 / 9),  # the essential item only
        ([True, True, False, True], 7 / 9, (5 + 3 - 1) / 9),  # a pitfall costs its weight
        ([False, False, False, True], 0.0, -1 / 9),  # below 0: clipped, or kept
        ([False, False, False, False], 0.0, 0.0),
    ],
)
def test_the_score_is_the_weighted_share_of_satisfied_items(satisfied, clipped, raw) -> None:
    assert [i.weight for i in ITEMS] == [5.0, 3.0, 1.0, -1.0]
    assert rubric_score(ITEMS, satisfied, clip=True) == pytest.approx(clipped)
    assert rubric_score(ITEMS, satisfied, clip=False) == pytest.approx(raw)


def test_explicit_weights_and_a_pitfall_of_minus_two() -> None:
    items = [RubricItem("a", 4.0), RubricItem("b", 1.0), RubricItem("trap", -2.0)]
    assert rubric_score(items, [False, True, True], clip=False) == pytest.approx((1 - 2) / 5)
    assert rubric_score(items, [True, False, True], clip=False) == pytest.approx((4 - 2) / 5)
    given = parse_rubric([{"criterion": "a", "weight": 4}, {"criterion": "trap", "weight": -2}], {}, "t")
    assert given == [RubricItem("a", 4.0), RubricItem("trap", -2.0)]


def judge_by_criterion(verdicts: dict[str, str]):
    """A judge answering each item prompt from a table criterion -> answer (the text of its answer)."""

    def judge(prompts: list[str]) -> list[str]:
        return [f"Reasoning. {verdicts[CRITERION.search(p).group(1)]}" for p in prompts]

    return judge


def test_scoring_rows_asks_about_every_item_and_reads_each_rows_own_rubric() -> None:
    rows = [{"rubric": RUBRIC}, {"rubric": RUBRIC[:1] + RUBRIC[3:]}]  # the second: essential + pitfall
    answers = {"Gives the answer 5.": "[[YES]]", "Shows the addition.": "[[no]]", "Is polite.": "[[YES]]"}
    answers["Claims that 2 + 3 is 6."] = "[[NO]] wait, [[YES]]"  # the last verdict counts
    pairs = [("2 + 3?", "5, you're welcome"), ("2 + 3?", "5 or 6")]
    scores = score_rubrics(
        pairs, rows, judge_by_criterion(answers), column="rubric", category_weights=DEFAULT_CATEGORY_WEIGHTS,
        clip=False, on_unparseable="skip", what="stage 's'",
    )  # fmt: skip
    assert scores == pytest.approx([(5 + 1 - 1) / 9, (5 - 1) / 5])


def test_an_unparseable_answer_makes_the_row_nan_or_stops_naming_row_and_criterion() -> None:
    answers = {r["criterion"]: "[[YES]]" for r in RUBRIC} | {"Is polite.": "I cannot say."}
    rows = [{"rubric": RUBRIC[:2]}, {"rubric": RUBRIC}]
    kwargs = {
        "column": "rubric",
        "category_weights": DEFAULT_CATEGORY_WEIGHTS,
        "clip": True,
        "what": "stage 's'",
    }
    pairs = [("q", "a"), ("q", "b")]
    scores = score_rubrics(pairs, rows, judge_by_criterion(answers), on_unparseable="skip", **kwargs)
    assert scores[0] == 1.0 and math.isnan(scores[1])
    with pytest.raises(RubricJudgeParseError, match=r"stage 's', row 1 \(0-based\).*criterion 'Is polite.'"):
        score_rubrics(pairs, rows, judge_by_criterion(answers), on_unparseable="fail", **kwargs)


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        (None, "expected a non-empty list of rubric items, got None"),
        ([], "expected a non-empty list"),
        ("[{]", "the rubric is text but not JSON"),
        ([{"weight": 2}], r"item 0: expected \{criterion: text, weight or category\}"),
        ([{"criterion": "a", "weight": 1, "category": "essential"}], "item 0: give exactly one of weight or"),
        ([{"criterion": "a", "category": "vital"}], "item 0: unknown category 'vital'; known: essential"),
        ([{"criterion": "a", "weight": "high"}], "item 0: weight must be a finite number"),
        ([{"criterion": "trap", "category": "pitfall"}], "no item has a positive weight"),
    ],
)  # fmt: skip
def test_bad_rubrics_are_refused_naming_row_column_and_item(cell, message) -> None:
    where = "stage 's', row 3 (0-based), column 'rubric'"
    with pytest.raises(RubricError, match=rf"stage 's', row 3 \(0-based\), column 'rubric'.*{message}"):
        parse_rubric(cell, DEFAULT_CATEGORY_WEIGHTS, where)
    assert parse_rubric('[{"criterion": "a", "weight": 2}]', {}, where) == [RubricItem("a", 2.0)]


def test_the_spec_fills_the_defaults_and_refuses_bad_fields() -> None:
    spec = RubricSpec(judge={"base_url": "http://h:1/v1", "model": "judge-7b"})
    assert spec.column == "rubric" and spec.clip and spec.source_name == "rubric:judge-7b"
    assert spec.weights == {"essential": 5.0, "important": 3.0, "optional": 1.0, "pitfall": -1.0}
    assert RubricSpec(judge=spec.judge, weights={"Pitfall": -2}).weights == {"pitfall": -2.0}
    for fields, where in [
        ({"weights": {"pitfall": math.nan}}, "weights"),
        ({"on_unparseable": "ignore"}, "on_unparseable"),
        ({"judge": {"base_url": "localhost", "model": "m"}}, "judge.base_url"),
        ({"columns": "rubric"}, "columns"),
    ]:
        with pytest.raises(ValidationError, match=re.escape(where)):
            RubricSpec(**({"judge": spec.judge} | fields))


def test_a_judge_on_a_real_endpoint_scores_and_a_rerun_is_served_from_the_cache(tmp_path) -> None:
    def judge(turn: str) -> str:  # says YES to an item when the response holds the criterion's first word
        word = CRITERION.search(turn).group(1).split()[0]
        return "[[YES]]" if word in RESPONSE.search(turn).group(1) else "[[NO]]"

    rows = [
        {"prompt": "q", "completion": "Gives polite", "answers": [{"criterion": "Gives x", "weight": 3},
         {"criterion": "polite y", "weight": 1}, {"criterion": "Claims z", "weight": -2}]},
        {"prompt": "q", "completion": "Claims", "answers": [{"criterion": "Gives x", "weight": 3},
         {"criterion": "Claims z", "weight": -2}]},
    ]  # fmt: skip
    pairs = [(r["prompt"], r["completion"]) for r in rows]
    with scripted_chat_server(judge) as server:
        spec = RubricSpec(column="answers", judge={"base_url": server.base_url, "model": "j"}, clip=False)
        source = type("Source", (), {"name": spec.source_name, "rubric": spec})()  # a reward source's shape
        (scorer,) = rubric_scorers([source], VerdictCache(tmp_path), "s").values()
        assert scorer(pairs, rows) == pytest.approx([4 / 4, -2 / 3])
        assert len(server.requests) == 5  # one request per item
        assert scorer(pairs, rows) == pytest.approx([1.0, -2 / 3])
        assert len(server.requests) == 5  # the verdict cache answered
        assert server.requests[0]["temperature"] == 0.0


@pytest.mark.usefixtures("one_torch_thread")
def test_a_tiny_policy_as_judge_gives_unparseable_answers_that_are_counted_as_nan() -> None:
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    judge = policy_rubric_judge(model, tokenizer, max_new_tokens=4)
    spec = RubricSpec(judge={"base_url": "http://unused:1/v1", "model": "tiny"})
    scores = rubric_scorer(spec, judge, "stage 's'")([("2 + 3?", "5")], [{"rubric": RUBRIC}])
    assert len(scores) == 1 and math.isnan(scores[0])  # random weights do not write [[YES]]/[[NO]]
