"""The sample stage's work in rlhf_core: N completions per prompt, scored by reward sources."""

from __future__ import annotations

import pytest

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.modeling.models import build_tiny_model, save_model
from rlhf_core.rollout.sampling import SampleInputs, sample_and_score
from rlhf_core.spec import SampleStage, TinyModelSource
from rlhf_core.stage_environment import StageEnvironment

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sample_and_score_keeps_prompt_order_and_the_weighted_sum(tmp_path):
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    policy_dir = str(save_model(model, tokenizer, tmp_path / "policy"))
    stage = SampleStage(
        kind="sample",
        policy="sft",
        prompts="data.prompts",
        n=3,
        max_prompts=4,
        generation={"temperature": 1.0, "max_new_tokens": 5},
        rewards=[{"function": "length_penalty", "weight": 2.0}, {"function": "answer_format"}],
    )
    prompts = synthetic_records("arithmetic", "prompts", n=6, seed=0, max_operand=9)
    result = sample_and_score(
        stage, SampleInputs(policy_dir, None, prompts), StageEnvironment.local("sample", 0, tmp_path)
    )
    assert [(r["prompt_index"], r["completion_index"]) for r in result.rows] == [
        (i, j) for i in range(4) for j in range(3)
    ]
    assert all(r["answer"] == prompts[r["prompt_index"]]["answer"] for r in result.rows)
    for r in result.rows:
        assert r["reward"] == pytest.approx(
            2.0 * r["scores"]["length_penalty"] + r["scores"]["answer_format"]
        )
    summary = result.summary()
    assert summary["completions"] == 12 and summary["dropped"] == 0
    assert summary["new_tokens_per_second"] > 0
    assert {"prompt", "completion", "reward", "scores", "new_tokens"} <= set(result.columns)
