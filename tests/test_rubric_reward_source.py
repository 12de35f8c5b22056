"""A rubric as a reward source of the ``sample`` stage (book ch.12): the spec's ``rubric:`` source, its
scorer built with the stage's other endpoint scorers, each completion scored by its prompt's own rubric
through the composite reward. A real tiny policy samples; a real HTTP server judges."""

from __future__ import annotations

import re

import pytest
from scripted_chat_server import scripted_chat_server

from rlhf_core.judging.endpoint_stage_judges import reward_scorers
from rlhf_core.modeling.models import build_tiny_model, save_model
from rlhf_core.rollout.sampling import SampleInputs, sample_and_score
from rlhf_core.spec import RewardSourceSpec, SampleStage, TinyModelSource
from rlhf_core.stage_environment import StageEnvironment

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(
        "rubric" not in RewardSourceSpec.model_fields, reason="the rubric reward source is not wired in yet"
    ),
]
CRITERION = re.compile(r"\[Criterion\]\n(.*?)\n\n", re.DOTALL)


def test_each_completion_is_scored_by_its_prompts_rubric(tmp_path) -> None:
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    policy_dir = str(save_model(model, tokenizer, tmp_path / "policy"))
    prompt_rows = [  # the judge says YES to criteria starting "Yes": row 0 scores 3/4, row 1 (5 - 2)/5
        {"prompt": "What is 2 + 3?", "rubric": [{"criterion": "Yes: says 5.", "category": "important"},
                                                {"criterion": "No: is polite.", "weight": 1}]},
        {"prompt": "What is 1 + 1?", "rubric": [{"criterion": "Yes: says 2.", "category": "essential"},
                                                {"criterion": "Yes: says 3.", "weight": -2}]},
    ]  # fmt: skip
    with scripted_chat_server(
        lambda turn: f"[[{CRITERION.search(turn).group(1).split(':')[0].upper()}]]"
    ) as server:
        source = {"rubric": {"judge": {"base_url": server.base_url, "model": "judge"}}, "weight": 2.0}
        stage = SampleStage(
            kind="sample", policy="base", prompts="data.prompts", n=2, rewards=[source],
            generation={"max_new_tokens": 4},
        )  # fmt: skip
        assert stage.rewards[0].name == "rubric:judge"
        scorers = reward_scorers(stage.rewards, tmp_path / "cache", "sample")
        env = StageEnvironment.local("sample", 0, tmp_path)
        result = sample_and_score(stage, SampleInputs(policy_dir, None, prompt_rows, {}, scorers), env)
    assert len(server.requests) == 2 * 2 * 2  # prompts x completions x items
    by_prompt = {r["prompt"]: r for r in result.rows}
    assert by_prompt["What is 2 + 3?"]["scores"] == {"rubric:judge": pytest.approx(3 / 4)}
    assert by_prompt["What is 1 + 1?"]["scores"] == {"rubric:judge": pytest.approx(3 / 5)}
    assert by_prompt["What is 1 + 1?"]["reward"] == pytest.approx(2.0 * 3 / 5)  # the source's weight
