"""Evaluating in an environment (book ch.13): pass^k, tool-call figures, gold-call match, task success
through the evaluate stage's work, and successful episodes kept as SFT trajectories."""

from __future__ import annotations

import math

import pytest

from rlhf_core.evaluation.episodes import episode_figures, gold_call_match, pass_hat_k, pass_hat_k_metrics
from rlhf_core.evaluation.statistics import pass_at_k
from rlhf_core.selection.rejection_sampling import select_completions, to_sft_records


def test_pass_hat_k_is_the_chance_that_k_trials_all_succeed():
    # 4 trials, 3 successes: pass^1 = 3/4, pass^2 = C(3,2)/C(4,2) = 3/6, pass^3 = 1/4, pass^4 = 0
    assert [pass_hat_k(4, 3, k) for k in (1, 2, 3, 4)] == [0.75, 0.5, 0.25, 0.0]
    assert pass_hat_k(5, 5, 5) == 1.0 and pass_hat_k(5, 0, 1) == 0.0
    # pass^1 = pass@1; for k > 1, pass^k <= pass@1 <= pass@k
    for n, c in [(8, 3), (8, 7), (6, 1)]:
        assert pass_hat_k(n, c, 1) == pytest.approx(pass_at_k(n, c, 1))
        for k in range(2, n + 1):
            assert pass_hat_k(n, c, k) <= pass_at_k(n, c, 1) <= pass_at_k(n, c, k)
    with pytest.raises(ValueError, match="pass\\^k needs"):
        pass_hat_k(3, 4, 1)


def test_pass_hat_k_metrics_average_over_prompts_with_intervals():
    correct = [[True, True, True, True], [True, False, True, False], [False] * 4]
    metrics = pass_hat_k_metrics(correct, [1, 2], seed=0)
    assert metrics["eval/pass_hat_1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert metrics["eval/pass_hat_2"] == pytest.approx((1 + 1 / 6 + 0) / 3)
    assert (
        metrics["eval/pass_hat_2_n"] == 3 and metrics["eval/pass_hat_2_ci_low"] <= metrics["eval/pass_hat_2"]
    )


def _calls(*calls):
    tool_calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": arguments}}
        for i, (name, arguments) in enumerate(calls)
    ]
    return [{"role": "assistant", "content": "", "tool_calls": tool_calls}]


def test_gold_call_match_compares_names_and_arguments_in_order():
    gold = {"gold_tool_calls": [{"name": "calculator", "arguments": {"expression": "2 * 3"}}]}
    assert gold_call_match(gold, _calls(("calculator", {"expression": "2 * 3"}))) == 1.0
    assert gold_call_match(gold, _calls(("calculator", '{"expression": "2 * 3"}'))) == 1.0  # JSON text
    assert gold_call_match(gold, _calls(("calculator", {"expression": "3 * 2"}))) == 0.0
    assert gold_call_match(gold, _calls(("python", {"expression": "2 * 3"}))) == 0.0
    assert gold_call_match(gold, []) == 0.0
    both = _calls(("calculator", {"expression": "2 * 3"}), ("calculator", {"expression": "1"}))
    assert gold_call_match(gold, both) == 0.0
    assert gold_call_match({}, both) is None


def test_episode_figures_count_turns_outcomes_calls_and_validity():
    rows = [
        {"turns": 2, "outcome": "done", "tool_calls": 1.0, "valid_tool_calls": 1.0, "tool_call_match": 1.0},
        {
            "turns": 3,
            "outcome": "turn_limit",
            "tool_calls": 3.0,
            "valid_tool_calls": 1.0,
            "tool_call_match": 0.0,
        },
        {"turns": 1, "outcome": "done", "tool_calls": 0.0, "valid_tool_calls": 0.0, "tool_call_match": None},
    ]
    figures = episode_figures(rows, seed=0)
    assert figures["eval/episode/turns"] == 2.0
    assert figures["eval/episode/done_share"] == pytest.approx(2 / 3)
    assert figures["eval/episode/turn_limit_share"] == pytest.approx(1 / 3)
    assert figures["eval/episode/tool_calls"] == pytest.approx(4 / 3)
    assert figures["eval/tool_call_validity"] == pytest.approx(2 / 4)
    assert figures["eval/tool_call_match"] == 0.5 and figures["eval/tool_call_match_n"] == 2
    assert math.isfinite(figures["eval/episode/turns_ci_low"])


def test_successful_episodes_become_sft_trajectories_with_their_tools():
    messages = [
        {"role": "user", "content": "What is 2 * 3?"},
        *_calls(("calculator", {"expression": "2 * 3"})),
        {"role": "tool", "tool_call_id": "c0", "name": "calculator", "content": "6"},
        {"role": "assistant", "content": "The answer is 6."},
    ]
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    episode = {
        "prompt": "What is 2 * 3?", "completion": "The answer is 6.", "messages": messages, "tools": tools,
        "outcome": "done", "turns": 2, "reward": 1.0, "prompt_index": 0, "completion_index": 0,
    }  # fmt: skip
    failed = {**episode, "completion": "The answer is 5.", "reward": 0.0, "completion_index": 1}
    plain = {
        "prompt": "What is 1 + 1?",
        "completion": "2",
        "reward": 1.0,
        "prompt_index": 1,
        "completion_index": 0,
    }
    selected = select_completions([episode, failed, plain], "top_per_prompt", None, min_reward=1.0)
    records = to_sft_records(selected)
    assert records[0] == {"messages": messages, "tools": tools, "reward": 1.0}
    assert records[1]["messages"] == [{"role": "user", "content": "What is 1 + 1?"},
                                      {"role": "assistant", "content": "2"}]  # fmt: skip
