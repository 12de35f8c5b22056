"""The GRPO step and sampling call that the rollout-engine benchmarks time (benchmarks/rollout_loop.py):
a timed step must really train (parameters move, every part is timed) and the token counts must be the
tokens generated, or the benchmarks' rates would be wrong."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from rollout_loop import StepSettings, digit_share_rewards, grpo_step, sample_with  # noqa: E402

from rlhf_core.modeling.models import build_tiny_model  # noqa: E402
from rlhf_core.rollout.token_scoring import encode_prompts  # noqa: E402
from rlhf_core.spec import TinyModelSource  # noqa: E402

PROMPTS = ["What is 3 + 4?", "What is 12 - 5?"]


def tiny_policy():
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2), seed=0)
    return model.eval(), tokenizer


def test_grpo_step_updates_the_policy_and_times_every_part():
    torch.manual_seed(0)
    policy, tokenizer = tiny_policy()
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    settings = StepSettings(
        group_size=4, max_new_tokens=12, temperature=1.0, batch_size=8, micro_batch=1, score=True
    )
    prompt_ids = encode_prompts(tokenizer, PROMPTS)
    times, new_tokens = grpo_step(policy, optimizer, tokenizer, prompt_ids, settings, seed=0)
    assert set(times) == {"generation", "reward", "scoring", "update"}  # no engine: no sync, no release
    assert all(seconds > 0 for seconds in times.values())
    assert 8 <= new_tokens <= 8 * 12  # 2 prompts x 4 samples, each 1..max_new_tokens tokens
    moved = sum(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
    assert moved == len(before)  # the placeholder reward varies, so every parameter gets a gradient
    assert not policy.training  # handed back in eval mode, ready for the next rollout


def test_digit_share_rewards_reads_the_decoded_text():
    _, tokenizer = tiny_policy()
    completions = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("12ab", "abcd", "7")]
    assert digit_share_rewards(tokenizer, completions).tolist() == [0.5, 0.0, 1.0]


def test_sample_with_counts_every_generated_token():
    policy, tokenizer = tiny_policy()
    sampled = sample_with(
        "native", policy, tokenizer, PROMPTS, n=3, max_new_tokens=5, temperature=1.0, batch_size=6, seed=0
    )
    assert sampled.sequences == 6 and 6 <= sampled.new_tokens <= 30 and sampled.seconds > 0
