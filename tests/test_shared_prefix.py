"""Shared-prefix scoring: one row per prompt gives the rewards and gradients of one row per sequence."""

from __future__ import annotations

import pytest
import torch

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.modeling.models import build_tiny_model, save_model
from rlhf_core.modeling.preference_tokens import encode_completion, pad_batch
from rlhf_core.modeling.reward_model import build_reward_model
from rlhf_core.modeling.shared_prefix import pack_shared_prefix, score_shared_prefix, supports_shared_prefix
from rlhf_core.rewards.reward_model_scoring import score_pairs, score_sequences
from rlhf_core.spec import RewardTrainSpec, TinyModelSource
from rlhf_core.training.reward_model.trainer import train_reward_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_layout_of_one_row():
    rows = pack_shared_prefix([[[1, 2, 3], [1, 2, 4, 5], [1, 2, 3]], [[7, 8]]], pad_token_id=0)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 2, 3], [0, 1, 0, 0, 0]]
    # the duplicate [1, 2, 3] points at the same end token; a lone sequence keeps one own token
    ends = list(zip(rows.score_rows.tolist(), rows.score_cols.tolist(), strict=True))
    assert ends == [(0, 2), (0, 4), (0, 2), (1, 1)]
    mask = rows.attention_mask[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # suffix [3]: prefix and itself
        [1, 1, 0, 1, 0],  # suffix [4, 5] never sees suffix [3]
        [1, 1, 0, 1, 1],
    ]
    assert rows.attention_mask[1, 0].int().tolist()[3] == [0, 0, 0, 1, 0]  # padding sees only itself
    assert rows.tokens == 7 and rows.sequence_tokens == 12


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=64, layers=2, heads=4, vocab_size=512), 0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model"), tokenizer


def _groups(tokenizer):
    records = synthetic_records("arithmetic", "preference", n=12, seed=1)
    groups = [
        [
            encode_completion(tokenizer, r["prompt"], text)
            for text in (r["chosen"], r["rejected"], r["chosen"])
        ]
        for r in records[:6]
    ]
    return groups + [[encode_completion(tokenizer, "hi", "x")]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_rewards_and_gradients_match_one_row_per_sequence(reward_model_dir, attention):
    directory, tokenizer = reward_model_dir
    model = build_reward_model(str(directory))
    model.set_attn_implementation(attention)
    torch.nn.init.normal_(model.score.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    assert supports_shared_prefix(model)
    groups = _groups(tokenizer)
    rows = pack_shared_prefix(groups, tokenizer.pad_token_id)
    assert rows.tokens < 0.6 * rows.sequence_tokens  # the prompt is processed once, not three times

    shared = score_shared_prefix(model, rows)
    separate = score_sequences(model, pad_batch([s for g in groups for s in g], tokenizer.pad_token_id))
    assert shared.shape == separate.shape
    assert torch.allclose(shared, separate, atol=1e-5)
    grads_shared = torch.autograd.grad(shared.square().sum(), list(model.parameters()))
    grads_separate = torch.autograd.grad(separate.square().sum(), list(model.parameters()))
    for a, b in zip(grads_shared, grads_separate, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())

    # negative control: letting suffixes see each other changes the rewards, so the check above can fail
    leaky = rows.attention_mask | torch.ones_like(rows.attention_mask).tril()
    rows.attention_mask = leaky
    assert not torch.allclose(score_shared_prefix(model, rows), separate, atol=1e-3)


def test_training_with_and_without_shared_prefix_agrees(reward_model_dir, tmp_path):
    directory, tokenizer = reward_model_dir
    records = synthetic_records("arithmetic", "preference", n=48, seed=0)
    losses = {}
    for shared in (True, False):
        cfg = RewardTrainSpec(max_steps=4, lr=1e-3, batch_size=4, shared_prefix=shared, log_every=1)
        logged = []
        model, result = train_reward_model(
            build_reward_model(str(directory)),
            tokenizer,
            records,
            cfg,
            seed=0,
            checkpoint_dir=tmp_path / str(shared),
            log=lambda m, s, logged=logged: logged.append(m),
        )
        losses[shared] = [m["train/loss"] for m in logged]
        processed = sum(m["train/processed_tokens"] for m in logged)
        assert (processed < 0.8 * result.input_tokens) if shared else (processed == result.input_tokens)
        scores = score_pairs(
            model, tokenizer, [(r["prompt"], r["chosen"]) for r in records[:10]], shared_prefix=shared
        )
        losses[(shared, "scores")] = scores
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
    assert losses[(True, "scores")] == pytest.approx(losses[(False, "scores")], abs=1e-4)


def test_a_long_group_is_split_over_rows_with_the_same_scores(reward_model_dir):
    directory, tokenizer = reward_model_dir
    model = build_reward_model(str(directory))
    torch.nn.init.normal_(model.score.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    groups = _groups(tokenizer)
    longest = max(len(s) for g in groups for s in g)
    rows = pack_shared_prefix(groups, tokenizer.pad_token_id, max_row_tokens=longest + 2)
    assert rows.input_ids.shape[0] > len(groups)  # groups of 2 distinct completions no longer fit one row
    assert rows.input_ids.shape[1] <= longest + 2
    separate = score_sequences(model, pad_batch([s for g in groups for s in g], tokenizer.pad_token_id))
    assert torch.allclose(score_shared_prefix(model, rows), separate, atol=1e-5)


def test_shared_prefix_is_refused_where_a_custom_mask_would_be_wrong(reward_model_dir):
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        MistralConfig,
        MistralForSequenceClassification,
    )

    small = {"vocab_size": 64, "num_labels": 1}
    mistral = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    windowed = MistralForSequenceClassification(MistralConfig(**small, **mistral, sliding_window=16))
    full = MistralForSequenceClassification(MistralConfig(**small, **mistral, sliding_window=None))
    gpt2 = GPT2ForSequenceClassification(GPT2Config(**small, n_embd=32, n_layer=1, n_head=2))
    assert supports_shared_prefix(full)
    assert not supports_shared_prefix(windowed)  # the mask would silently widen the window
    assert not supports_shared_prefix(gpt2)  # not a listed architecture
    directory, _ = reward_model_dir
    flash_like = build_reward_model(str(directory))
    flash_like.config._attn_implementation = "flash_attention_2"
    assert not supports_shared_prefix(flash_like)


def test_score_pairs_takes_conversational_prompts(reward_model_dir):
    """A prompt given as messages scores as the same text given plainly, and groups with it."""
    directory, tokenizer = reward_model_dir
    model = build_reward_model(str(directory))
    torch.nn.init.normal_(model.score.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    text = "What is 2 + 3?"
    plain = score_pairs(model, tokenizer, [(text, "5"), (text, "6")])
    mixed = score_pairs(model, tokenizer, [([{"role": "user", "content": text}], "5"), (text, "6")])
    assert mixed == pytest.approx(plain, abs=1e-6)
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    (other,) = score_pairs(model, tokenizer, [(with_system, "5")])
    assert other != pytest.approx(plain[0], abs=1e-6)  # the system turn is part of what is scored
