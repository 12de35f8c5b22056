"""The evaluate stage's work for one model, in rlhf_core: loss, verified accuracy, best-of-N, samples."""

from __future__ import annotations

import pytest

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.errors import UserError
from rlhf_core.evaluation.evaluate import evaluate_model
from rlhf_core.modeling.models import build_tiny_model, save_model
from rlhf_core.spec import EvaluateStage, TinyModelSource

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = synthetic_records("arithmetic", "prompts", n=6, seed=1, max_operand=9)
SFT = synthetic_records("arithmetic", "sft", n=4, seed=2, max_operand=9)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    return str(save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model"))


def _stage(**fields) -> EvaluateStage:
    base = {"kind": "evaluate", "models": ["base"], "data": "data.sft", "prompts": "data.prompts"}
    return EvaluateStage(**{**base, "generation": {"max_new_tokens": 4}, **fields})


def test_metrics_and_samples_of_one_model(model_dir):
    stage = _stage(
        max_prompts=5,
        samples_in_table=3,
        best_of_n={
            "n": 3,
            "rewards": [{"function": "arithmetic_exact"}],
            "generation": {"max_new_tokens": 4},
        },
    )
    result = evaluate_model(model_dir, None, SFT, PROMPTS, stage, {}, seed=0, stage_name="eval")
    metrics, samples = result.metrics, result.samples
    assert metrics["eval/loss"] > 0 and metrics["eval/tokens"] > 0
    assert 0 <= metrics["eval/accuracy"] <= 1
    assert metrics["eval/accuracy_ci_low"] <= metrics["eval/accuracy"] <= metrics["eval/accuracy_ci_high"]
    assert metrics["eval/accuracy_n"] == 5
    assert [s["prompt"] for s in samples] == [p["prompt"] for p in PROMPTS[:3]]
    assert all(isinstance(s["correct"], bool) for s in samples)
    assert metrics["eval/best_of_n/prompts"] == 5  # max_prompts applies to best-of-N too
    # the verifier as the only reward: best-of-N finds a correct sample whenever there is one
    assert metrics["eval/best_of_n/accuracy"] == metrics["eval/best_of_n/pass_at_n"]


def test_a_prompt_without_answer_fails_naming_the_row_before_any_model_loads():
    rows = [*PROMPTS[:2], {"prompt": "What is 1 + 1?"}, *PROMPTS[2:]]
    with pytest.raises(
        UserError, match=r"stage 'eval', field prompts: 1 row\(s\) of data.prompts, e.g. row 2"
    ):
        evaluate_model(
            "/nonexistent",
            None,
            [],
            rows,
            _stage(),
            {},
            seed=0,
            stage_name="eval",
            prompts_source="data.prompts",
        )


def test_reward_sources_score_each_models_answers(model_dir):
    """`rewards:` reports each source's mean score over the greedy answers: the verifier's mean is the
    accuracy itself, and a length penalty agrees with the answers' lengths."""
    from rlhf_core.rewards.functions import REWARD_FUNCTIONS

    rewards = [{"function": "arithmetic_exact"}, {"function": "length_penalty"}]
    long_answers = {"max_new_tokens": 32}  # the random model's answers run past the penalty's 40 characters
    stage = _stage(max_prompts=5, rewards=rewards, generation=long_answers)
    metrics = evaluate_model(model_dir, None, [], PROMPTS, stage, {}, seed=0, stage_name="eval").metrics
    assert metrics["eval/reward/arithmetic_exact"] == pytest.approx(metrics["eval/accuracy"])
    stage_all = _stage(max_prompts=5, samples_in_table=5, generation=long_answers)
    answers = evaluate_model(model_dir, None, [], PROMPTS, stage_all, {}, seed=0, stage_name="eval").samples
    expected = sum(REWARD_FUNCTIONS["length_penalty"](a["completion"], a) for a in answers) / 5
    assert metrics["eval/reward/length_penalty"] == pytest.approx(expected) and expected < 0
    low, high = metrics["eval/reward/length_penalty_ci_low"], metrics["eval/reward/length_penalty_ci_high"]
    assert low <= expected <= high and metrics["eval/reward/length_penalty_n"] == 5


def test_reward_sources_need_prompts():
    with pytest.raises(ValueError, match="rewards score the models' completions of the prompts"):
        EvaluateStage(
            kind="evaluate", models=["base"], data="data.sft", rewards=[{"function": "answer_format"}]
        )


def test_a_model_compared_with_itself_is_at_parity_and_at_zero_kl(model_dir, tmp_path):
    """Two names for the same weights: every answer identical, so every judge ties (win rate exactly 0.5,
    tie rate 1, a policy judge never asked) and the KL estimate is 0; the baseline gets no win rate."""
    from rlhf_core.evaluation.comparison import EvaluationInputs, compare_models
    from rlhf_core.stage_environment import StageEnvironment

    judges = [
        "verifier",
        {"function": "length_penalty"},
        {"policy": {"model": "judge", "principles": ["Be right."], "max_new_tokens": 4}},
    ]
    stage = _stage(
        models=["base", "copy"], baseline="base", win_rate={"judges": judges}, samples_in_table=2,
        kl={"samples_per_prompt": 2, "max_new_tokens": 4},
    )  # fmt: skip
    inputs = EvaluationInputs(
        {"base": (model_dir, None), "copy": (model_dir, None)}, SFT, PROMPTS,
        judge_models={"policy:judge": (model_dir, None)}, reference=(model_dir, None),
    )  # fmt: skip
    result = compare_models(stage, inputs, StageEnvironment.local("eval", 0, tmp_path))
    base, copy = result.report["base"], result.report["copy"]
    for judge in ("verifier", "length_penalty", "policy:judge"):
        assert copy[f"eval/win_rate/{judge}"] == 0.5 and copy[f"eval/tie_rate/{judge}"] == 1.0
        assert copy[f"eval/win_rate/{judge}_n"] == len(PROMPTS)
        assert f"eval/win_rate/{judge}" not in base
    assert copy["eval/judge_unparseable/policy:judge"] == 0
    assert base["eval/kl_to_reference"] == 0.0  # the baseline is the reference: 0 by definition
    assert copy["eval/kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # estimated from samples
    assert [s["model"] for s in result.samples] == ["base", "base", "copy", "copy"]
    assert base["eval/accuracy"] == copy["eval/accuracy"] and base["eval/nll"] == copy["eval/nll"]
    summary = result.summary()
    assert summary["copy.win_rate/verifier"] == 0.5 and summary["base.kl_to_reference"] == 0.0
    assert "base.win_rate/verifier" not in summary


def test_the_figures_a_gate_may_name_are_those_the_stage_reports(model_dir, tmp_path):
    """``EvaluateStage.measured_figures`` (what the spec lets a promote gate name) lists exactly what the
    evaluation writes for each model, with an interval (``_ci_low``, ``_ci_high``, ``_n``) where it says
    so: every kind of figure switched on, a baseline (no win rate) and a candidate."""
    from rlhf_core.evaluation.comparison import EvaluationInputs, compare_models
    from rlhf_core.stage_environment import StageEnvironment

    policy_judge = {"policy": {"model": "judge", "principles": ["Be right."], "max_new_tokens": 4}}
    stage = _stage(
        models=["base", "copy"], baseline="base", rewards=[{"function": "answer_format"}],
        win_rate={"judges": ["verifier", {"function": "length_penalty"}, policy_judge]},
        kl={"samples_per_prompt": 2, "max_new_tokens": 4}, pass_at_k={"n": 2, "k": [1, 2]},
        best_of_n={"n": 2, "rewards": [{"function": "answer_format"}], "generation": {"max_new_tokens": 4}},
    )  # fmt: skip
    inputs = EvaluationInputs(
        {"base": (model_dir, None), "copy": (model_dir, None)}, SFT, PROMPTS,
        judge_models={"policy:judge": (model_dir, None)}, reference=(model_dir, None),
    )  # fmt: skip
    report = compare_models(stage, inputs, StageEnvironment.local("eval", 0, tmp_path)).report
    interval = ("_ci_low", "_ci_high", "_n")
    for model in ("base", "copy"):
        declared = stage.measured_figures(model)
        expected = {f"eval/{name}" for name in declared}
        expected |= {f"eval/{name}{part}" for name, has in declared.items() if has for part in interval}
        assert set(report[model]) == expected, (model, set(report[model]) ^ expected)


def test_with_an_environment_accuracy_is_task_success_over_episodes_and_tool_use_is_measured(tmp_path):
    """One episode per prompt in the tools environment, its final answer verified; pass@k with pass^k;
    tool-use figures; transcripts in the samples (book ch.13)."""
    from rlhf_core.environments.tool_arithmetic import tool_arithmetic_records, tool_use_corpus

    shape = TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=600)
    model, tokenizer = build_tiny_model(shape, 0, tool_use_corpus())  # the tools fit in its context
    model_dir = str(save_model(model, tokenizer, tmp_path / "model"))

    prompts = tool_arithmetic_records("prompts", 5, 0, min_operand=10, max_operand=99)
    environment = {"name": "tools", "tools": ["calculator"], "max_turns": 2}
    stage = _stage(
        max_prompts=5, samples_in_table=2, environment=environment, data=None,
        pass_at_k={"n": 3, "k": [1, 3], "generation": {"temperature": 1.0, "max_new_tokens": 6}},
        generation={"max_new_tokens": 6}, kl=None,
    )  # fmt: skip
    result = evaluate_model(model_dir, None, [], prompts, stage, {}, seed=0, stage_name="eval")
    metrics = result.metrics
    assert metrics["eval/accuracy_n"] == 5 and 0 <= metrics["eval/accuracy"] <= 1
    for name in ("eval/episode/turns", "eval/tool_call_match", "eval/pass_hat_3"):
        assert name in metrics, name
    assert metrics["eval/tool_call_match"] == 0.0  # a right call takes ~25 tokens: 6 cannot hold one
    assert metrics["eval/pass_hat_3"] <= metrics["eval/pass_at_1"] <= metrics["eval/pass_at_3"]
    assert (
        sum(metrics[f"eval/episode/{o}_share"] for o in ("done", "turn_limit", "length", "context_limit"))
        == 1
    )
    assert len(result.samples) == 2 and result.samples[0]["transcript"].startswith("[user] What is")
    assert set(stage.measured_figures("base")) >= {"pass_hat_3", "episode/turns", "tool_call_match"}
