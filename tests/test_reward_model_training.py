"""Reward-model trainer on a tiny model: ln 2 at initialisation, learning, bad input, resume."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.evaluation.reward_model import evaluate_reward_model
from rlhf_core.modeling.models import build_tiny_model, save_model
from rlhf_core.modeling.preference_tokens import OverlongPairError
from rlhf_core.modeling.reward_model import build_reward_model
from rlhf_core.spec import RewardTrainSpec, TinyModelSource
from rlhf_core.training.reward_model.trainer import train_reward_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = synthetic_records("arithmetic", "preference", n=160, seed=0, max_operand=9)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model"), tokenizer


def test_loss_is_ln2_at_initialisation(policy_dir):
    directory, tokenizer = policy_dir
    metrics = evaluate_reward_model(
        build_reward_model(str(directory)), tokenizer, PAIRS[:20], RewardTrainSpec()
    )
    # the zero score head gives r_c = r_r = 0 for every pair, so -log sigma(0) = ln 2 exactly
    assert metrics["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["eval/reward_std"] == 0.0


def test_heldout_loss_is_the_training_estimator_with_margins_and_k_completions(policy_dir):
    """The held-out loss is bradley_terry_loss as in training: the margin column inside the sigmoid and
    each prompt's pairs averaged first (1/C(K,2) per pair), then the prompts."""
    from itertools import combinations

    from rlhf_core.modeling.preference_tokens import group_pairs
    from rlhf_core.rewards.reward_model_scoring import score_pairs
    from rlhf_core.training.reward_model.trainer import pairs_loss

    directory, tokenizer = policy_dir
    model = build_reward_model(str(directory))
    torch.nn.init.normal_(model.score.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    first, second = PAIRS[0], PAIRS[1]
    texts = [first["chosen"], first["rejected"], "I do not know."]  # K = 3: C(3, 2) = 3 pairs
    rows = [
        {"prompt": first["prompt"], "chosen": c, "rejected": r, "margin": m}
        for (c, r), m in zip(combinations(texts, 2), (1.0, 0.5, 2.0), strict=True)
    ] + [{**second, "margin": 0.25}]
    cfg = RewardTrainSpec(margin_column="margin")
    heldout = evaluate_reward_model(model, tokenizer, rows, cfg)["eval/loss"]

    groups, _ = group_pairs(rows, tokenizer, max_length=cfg.max_length, margin_column="margin")
    with torch.no_grad():
        trained_on, _ = pairs_loss(model, groups, tokenizer.pad_token_id, torch.device("cpu"))
    assert heldout == pytest.approx(trained_on.item(), abs=1e-6)

    # by hand: -log sigma(r_c - r_r - m) = log(1 + exp(-(r_c - r_r - m))), per-prompt mean, then mean
    sequences = [(r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")]
    reward = dict(zip(sequences, score_pairs(model, tokenizer, sequences), strict=True))
    gaps = [reward[(r["prompt"], r["chosen"])] - reward[(r["prompt"], r["rejected"])] for r in rows]
    losses = [math.log1p(math.exp(-(gap - r["margin"]))) for gap, r in zip(gaps, rows, strict=True)]
    assert heldout == pytest.approx((sum(losses[:3]) / 3 + losses[3]) / 2, abs=1e-5)
    # the former held-out loss (mean over pairs, margins ignored) is another number on these rows
    assert abs(sum(math.log1p(math.exp(-gap)) for gap in gaps) / 4 - heldout) > 1e-2


def test_training_learns_a_preference(policy_dir, tmp_path):
    """An easy, learnable preference (a worked answer over a refusal) on a random-init backbone."""
    directory, tokenizer = policy_dir
    rows = [{**r, "rejected": "I do not know."} for r in PAIRS]
    cfg = RewardTrainSpec(epochs=2, lr=3e-3, batch_size=16, warmup_ratio=0.0, log_every=2)
    logged = []
    model, result = train_reward_model(
        build_reward_model(str(directory)),
        tokenizer,
        rows[:140],
        cfg,
        seed=0,
        checkpoint_dir=tmp_path / "ckpt",
        log=lambda m, s: logged.append(m),
    )
    assert result.pairs == 140 and result.skipped_pairs == 0
    assert logged[0]["train/loss"] < math.log(2)
    assert logged[-1]["train/loss"] < 0.4
    metrics = evaluate_reward_model(model, tokenizer, rows[140:], cfg)
    assert metrics["eval/accuracy"] == 1.0, metrics
    assert metrics["eval/margin_mean"] > 0.5


def test_overlong_pair_fails_with_its_row_or_is_skipped(policy_dir, tmp_path):
    directory, tokenizer = policy_dir
    rows = PAIRS[:3] + [{**PAIRS[3], "chosen": "1 " * 300}]
    with pytest.raises(OverlongPairError, match=r"in prefs, row 3 \(0-based\).*max_length 64"):
        train_reward_model(
            build_reward_model(str(directory)),
            tokenizer,
            rows,
            RewardTrainSpec(max_length=64),
            seed=0,
            checkpoint_dir=tmp_path / "a",
            source="prefs",
        )
    _, result = train_reward_model(
        build_reward_model(str(directory)),
        tokenizer,
        rows,
        RewardTrainSpec(max_length=64, on_overlong="skip", max_steps=1),
        seed=0,
        checkpoint_dir=tmp_path / "b",
    )
    assert result.skipped_pairs == 1 and result.pairs == 3


def test_reward_model_saves_and_loads_with_plain_from_pretrained(policy_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhf_core.modeling.preference_tokens import encode_completion, pad_batch
    from rlhf_core.rewards.reward_model_scoring import score_sequences

    directory, tokenizer = policy_dir
    cfg = RewardTrainSpec(max_steps=2, lr=1e-2)
    model, _ = train_reward_model(
        build_reward_model(str(directory)), tokenizer, PAIRS[:16], cfg, seed=0, checkpoint_dir=tmp_path / "c"
    )
    saved = save_model(model, tokenizer, tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(saved)
    batch = pad_batch(
        [encode_completion(tokenizer, PAIRS[0]["prompt"], PAIRS[0]["chosen"])], tokenizer.pad_token_id
    )
    with torch.no_grad():
        assert torch.allclose(score_sequences(model, batch), score_sequences(loaded, batch), atol=1e-6)


def test_build_reward_model_grows_embeddings_to_the_tokenizer_and_sets_pad(policy_dir):
    import copy

    from rlhf_core.modeling.preference_tokens import encode_completion, pad_batch
    from rlhf_core.rewards.reward_model_scoring import score_sequences

    directory, tokenizer = policy_dir
    bigger = copy.deepcopy(tokenizer)
    bigger.add_tokens(["<extra_a>", "<extra_b>"])  # like a hub tokenizer that gained chat tokens
    model = build_reward_model(str(directory), bigger)
    assert model.get_input_embeddings().num_embeddings == len(bigger) == len(tokenizer) + 2
    assert model.config.pad_token_id == bigger.pad_token_id
    rows = [encode_completion(bigger, "1 + 1?", "<extra_b>"), encode_completion(bigger, "hi", "2")]
    with torch.no_grad():
        assert score_sequences(model, pad_batch(rows, bigger.pad_token_id)).shape == (2,)


def test_a_tokenizer_that_pads_with_eos_gets_its_own_pad_and_every_scoring_path_agrees(policy_dir):
    """With pad == EOS, transformers' classifier would read the reward before the final <|im_end|>."""
    import copy

    from rlhf_core.modeling.preference_tokens import encode_completion, pad_batch
    from rlhf_core.modeling.reward_model import REWARD_PAD_TOKEN
    from rlhf_core.modeling.shared_prefix import pack_shared_prefix, score_shared_prefix
    from rlhf_core.rewards.reward_model_scoring import score_sequences

    directory, tokenizer = policy_dir
    eos_padded = copy.deepcopy(tokenizer)
    eos_padded.pad_token = eos_padded.eos_token
    model = build_reward_model(str(directory), eos_padded)
    assert eos_padded.pad_token == REWARD_PAD_TOKEN and eos_padded.pad_token_id != eos_padded.eos_token_id
    assert model.config.pad_token_id == eos_padded.pad_token_id
    torch.nn.init.normal_(model.score.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    rows = [encode_completion(eos_padded, PAIRS[0]["prompt"], PAIRS[0][k]) for k in ("chosen", "rejected")]
    rows.append(encode_completion(eos_padded, "hi", "2"))  # shorter: padded
    batch = pad_batch(rows, eos_padded.pad_token_id)
    with torch.no_grad():
        ours = score_sequences(model, batch)
        plain = model(**batch).logits.squeeze(-1)  # what a plain from_pretrained user gets
        shared = score_shared_prefix(model, pack_shared_prefix([rows[:2], rows[2:]], eos_padded.pad_token_id))
    assert torch.allclose(ours, plain, atol=1e-5)
    assert torch.allclose(ours, shared, atol=1e-5)


def test_grad_accumulation_gives_the_step_of_one_big_batch(policy_dir, tmp_path):
    """Micro-batches are regrouped by length inside a step; the step's update must not change."""
    directory, tokenizer = policy_dir
    rows = PAIRS[:48]
    weights = {}
    for batch_size, grad_accum in ((4, 3), (12, 1)):
        cfg = RewardTrainSpec(
            max_steps=3, lr=3e-3, batch_size=batch_size, grad_accum=grad_accum, warmup_ratio=0
        )
        model, _ = train_reward_model(
            build_reward_model(str(directory)),
            tokenizer,
            rows,
            cfg,
            seed=0,
            checkpoint_dir=tmp_path / str(batch_size),
        )
        weights[batch_size] = {k: v.clone() for k, v in model.state_dict().items()}
    start = build_reward_model(str(directory)).state_dict()
    difference = max((weights[4][k] - v).abs().max().item() for k, v in weights[12].items())
    moved = max((weights[12][k] - v).abs().max().item() for k, v in start.items() if k in weights[12])
    assert difference < 5e-5, difference  # AdamW turns float rounding of tiny gradients into ~1e-5
    assert moved > 1e-3  # and the weights did move
