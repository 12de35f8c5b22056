"""Constitutional AI's preference part (book ch.12): a pairwise judge in ``label_preferences`` sees a seeded
subset of the constitution per comparison (``principles_per_comparison``), recorded in each pair's row.

The judge is a real OpenAI-compatible HTTP server whose verdicts the test writes: it prefers the response
that says 5, so every pair gets a verdict and the test can read which principles each request carried."""

from __future__ import annotations

import re

import pytest
from scripted_chat_server import scripted_chat_server

from rlhf_core.judging.labeling import LabelingInputs, label_preferences, pair_columns
from rlhf_core.judging.policy_judge import judge_pairs, principle_subsets
from rlhf_core.spec import LabelPreferencesStage, SpecError, parse_spec
from rlhf_core.stage_environment import StageEnvironment

CONSTITUTION = [f"Principle {i}." for i in range(6)]
ROWS = [
    {"prompt": f"Question {q}: what is 2 + 3?", "completion": c}
    for q in range(5)
    for c in (f"It is 5 ({q}).", f"It is 6 ({q}).", f"It is 7 ({q}).")
]
RESPONSE_A = re.compile(r"\[Response A\]\n(.*?)\n\n\[Response B\]", re.DOTALL)
RULES = re.compile(r"principles:\n(.*?)\nIgnore the order", re.DOTALL)


def prefers_five(turn: str) -> str:
    return "[[A]]" if "5" in RESPONSE_A.search(turn).group(1) else "[[B]]"


def rules_in(turn: str) -> list[str]:
    """The principles listed in a judge prompt."""
    return [line.removeprefix("- ") for line in RULES.search(turn).group(1).splitlines()]


def _stage(base_url: str, **fields) -> LabelPreferencesStage:
    judge = {"base_url": base_url, "model": "judge", "principles": CONSTITUTION}
    return LabelPreferencesStage(
        **{"kind": "label_preferences", "completions": "sample", "judge_endpoint": judge}
        | {"pairing": "all_pairs", "splits": {"train": 1.0}}
        | fields
    )


def test_each_comparison_is_judged_under_its_own_seeded_subset_recorded_in_its_row(tmp_path) -> None:
    with scripted_chat_server(prefers_five) as server:
        stage = _stage(server.base_url, principles_per_comparison=2)
        labeling = label_preferences(
            stage, LabelingInputs(ROWS), StageEnvironment.local("prefs", 3, tmp_path)
        )
        turns = server.user_turns
    pairs = labeling.splits["train"]
    assert len(turns) == 2 * 5 * 3  # C(3, 2) pairs per prompt, both orders
    # the pair without a 5 gets [[B]] in both orders: a tie, dropped
    assert len(pairs) == 5 * 2 and labeling.report.dropped == {"tie": 5}
    asked: dict[tuple[str, str], list[str]] = {}
    for turn in turns:
        answers = re.findall(r"\[Response [AB]\]\n(.*?)\n\n", turn, re.DOTALL)
        rules = rules_in(turn)
        assert asked.setdefault(tuple(sorted(answers)), rules) == rules  # both orders: the same principles
    for pair in pairs:
        assert len(pair["principles"]) == 2 and set(pair["principles"]) <= set(CONSTITUTION)
        assert pair["principles"] == asked[tuple(sorted((pair["chosen"], pair["rejected"])))]
        assert pair["principles"] == sorted(pair["principles"], key=CONSTITUTION.index)  # constitution order
    assert len({tuple(p["principles"]) for p in pairs}) > 1  # a subset per comparison, not one for all
    assert all("5" in p["chosen"] for p in pairs if "5" in p["chosen"] + p["rejected"])
    assert pair_columns(stage) == ("chosen", "margin", "principles", "prompt", "rejected")


def test_the_subsets_repeat_with_the_seed_and_change_with_it() -> None:
    pairs = [(r["prompt"], r["completion"], "other") for r in ROWS]
    first = principle_subsets(CONSTITUTION, 3, pairs, seed=0)
    assert principle_subsets(CONSTITUTION, 3, pairs, seed=0) == first
    assert principle_subsets(CONSTITUTION, 3, pairs, seed=1) != first
    assert principle_subsets(CONSTITUTION, 3, pairs[5:], seed=0) == first[5:]  # a pair's own draw
    assert principle_subsets(CONSTITUTION, None, pairs, seed=0) is None
    assert {s for subset in first for s in subset} == set(CONSTITUTION)  # 15 draws of 3 of 6 cover all


def test_without_the_option_every_principle_judges_and_no_column_is_added(tmp_path) -> None:
    with scripted_chat_server(prefers_five) as server:
        stage = _stage(server.base_url)
        labeling = label_preferences(
            stage, LabelingInputs(ROWS), StageEnvironment.local("prefs", 3, tmp_path)
        )
        assert all(rules_in(turn) == CONSTITUTION for turn in server.user_turns)
    assert all("principles" not in p for p in labeling.splits["train"])
    assert pair_columns(stage) == ("chosen", "margin", "prompt", "rejected")


def test_a_policy_judges_prompts_carry_the_subset_of_their_pair() -> None:
    seen: list[str] = []

    def judge(prompts: list[str]) -> list[str]:  # a judge that reads its prompts, in place of a model
        seen.extend(prompts)
        return [prefers_five(p) for p in prompts]

    pairs = [(r["prompt"], r["completion"], "It is 5.") for r in ROWS[:4]]
    subsets = principle_subsets(CONSTITUTION, 1, pairs, seed=0)
    judge_pairs(judge, CONSTITUTION, pairs, subsets)
    assert [rules_in(p) for p in seen] == [list(s) for s in subsets for _ in range(2)]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"principles_per_comparison": 7}, "is 7 but judge_endpoint.principles has 6"),
        ({"principles_per_comparison": 0}, r"field principles_per_comparison: .*greater than or equal to 1"),
        (
            {"judge_endpoint": None, "judge": [{"function": "arithmetic_exact"}],
             "principles_per_comparison": 2},
            "principles_per_comparison needs a pairwise judge with principles",
        ),
        (
            {"judge_endpoint": {"base_url": "http://h/v1", "model": "m", "rubric": "Be right."},
             "principles_per_comparison": 1},
            "principles_per_comparison needs a pairwise judge",
        ),
    ],
)  # fmt: skip
def test_bad_subset_sizes_are_refused_naming_the_stage_and_field(tiny_spec_dict, fields, message) -> None:
    tiny_spec_dict["stages"]["sample"] = {
        "kind": "sample", "policy": "base", "prompts": "data.prompts",
        "rewards": [{"function": "arithmetic_exact"}],
    }  # fmt: skip
    tiny_spec_dict["stages"]["prefs"] = {
        "kind": "label_preferences", "completions": "sample",
        "judge_endpoint": {"base_url": "http://h/v1", "model": "m", "principles": CONSTITUTION},
    } | fields  # fmt: skip
    tiny_spec_dict["stages"]["prefs"] = {
        k: v for k, v in tiny_spec_dict["stages"]["prefs"].items() if v is not None
    }
    with pytest.raises(SpecError, match=rf"stage 'prefs'.*{message}"):
        parse_spec(tiny_spec_dict)
