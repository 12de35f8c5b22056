"""The reward_model stage with loss plackett_luce: rankings from K-wise pairs, bad orders refused."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch
from pydantic import ValidationError

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.errors import UserError
from rlhf_core.modeling.models import build_tiny_model, save_model
from rlhf_core.modeling.preference_tokens import group_pairs
from rlhf_core.modeling.reward_model import build_reward_model
from rlhf_core.rewards.reward_model_scoring import score_pairs
from rlhf_core.spec import RewardTrainSpec, TinyModelSource
from rlhf_core.spec.stages.reward_model import RewardModelStage
from rlhf_core.training.reward_model.trainer import pairs_loss, train_reward_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# one row per prompt (a repeated prompt with other answers would be another ranking of the same prompt)
PAIRS = list(
    {
        r["prompt"]: r for r in synthetic_records("arithmetic", "preference", n=60, seed=0, max_operand=9)
    }.values()
)[:40]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model"), tokenizer


def _kwise_rows(row: dict, texts: list[str]) -> list[dict]:
    """All C(K, 2) pairs of ``texts`` (best first), in reverse order, so that the first row's chosen is
    not the best completion: the ranking has to come from the pairs, not from row positions."""
    pairs = [{"prompt": row["prompt"], "chosen": c, "rejected": r} for c, r in combinations(texts, 2)]
    return pairs[::-1]


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_the_loss_is_plackett_luce_over_each_prompts_ranking(policy_dir, shared_prefix):
    directory, tokenizer = policy_dir
    model = build_reward_model(str(directory))
    torch.nn.init.normal_(model.score.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    first, second = PAIRS[0], PAIRS[1]
    ranked_first = [first["chosen"], "I do not know.", first["rejected"]]  # K = 3
    rows = _kwise_rows(first, ranked_first) + [second]  # and K = 2
    groups, _ = group_pairs(rows, tokenizer, max_length=256)
    with torch.no_grad():
        loss, _ = pairs_loss(
            model, groups, tokenizer.pad_token_id, torch.device("cpu"), shared_prefix, "plackett_luce"
        )
    # by hand: -sum_k [r_k - log sum_{j >= k} exp r_j], per prompt, then the mean over prompts
    sequences = [(first["prompt"], t) for t in ranked_first]
    sequences += [(second["prompt"], second["chosen"]), (second["prompt"], second["rejected"])]
    r = score_pairs(model, tokenizer, sequences)
    a, b, c, d, e = (float(v) for v in r)
    first_loss = -(a - math.log(math.exp(a) + math.exp(b) + math.exp(c))) - (
        b - math.log(math.exp(b) + math.exp(c))
    )
    second_loss = math.log1p(math.exp(-(d - e)))  # K = 2: Bradley-Terry
    assert loss.item() == pytest.approx((first_loss + second_loss) / 2, abs=1e-5)


def test_training_on_rankings_learns_them(policy_dir, tmp_path):
    """Worked answer > wrong answer > refusal for every prompt: the loss starts at log 3! (zero score head)
    and falls; putting the refusal last alone brings it to ln 2 (the two answers still tied)."""
    directory, tokenizer = policy_dir
    rows = [r for row in PAIRS for r in _kwise_rows(row, [row["chosen"], row["rejected"], "I do not know."])]
    cfg = RewardTrainSpec(epochs=2, lr=3e-3, batch_size=8, warmup_ratio=0.0, log_every=1)
    logged = []
    _, result = train_reward_model(
        build_reward_model(str(directory)), tokenizer, rows, cfg, seed=0, checkpoint_dir=tmp_path / "ckpt",
        log=lambda m, s: logged.append(m), loss_name="plackett_luce",
    )  # fmt: skip
    assert result.prompts == 40 and result.pairs == 120
    assert logged[0]["train/loss"] == pytest.approx(math.log(6), abs=1e-4)  # zero score head
    assert logged[-1]["train/loss"] < math.log(6) - 0.4


def test_pairs_without_one_order_are_refused_naming_the_prompts_rows(policy_dir, tmp_path):
    directory, tokenizer = policy_dir
    row = PAIRS[0]
    a, b, c = row["chosen"], row["rejected"], "I do not know."
    cycle = [
        {"prompt": row["prompt"], "chosen": a, "rejected": b},
        {"prompt": row["prompt"], "chosen": b, "rejected": c},
        {"prompt": row["prompt"], "chosen": c, "rejected": a},
    ]
    rows = [PAIRS[1], *cycle]
    with pytest.raises(
        UserError, match=r"the prompt of rows 1, 2, 3 \(0-based\): loss plackett_luce .*\(a cycle"
    ):
        train_reward_model(
            build_reward_model(str(directory)), tokenizer, rows, RewardTrainSpec(), seed=0,
            checkpoint_dir=tmp_path / "ckpt", source="prefs", loss_name="plackett_luce",
        )  # fmt: skip
    # the same rows train as Bradley-Terry pairs
    _, result = train_reward_model(
        build_reward_model(str(directory)), tokenizer, rows, RewardTrainSpec(), seed=0,
        checkpoint_dir=tmp_path / "bt", source="prefs",
    )  # fmt: skip
    assert result.pairs == 4


def _stage(**fields) -> RewardModelStage:
    return RewardModelStage(kind="reward_model", model="p", data="d.preferences", **fields)


def test_the_stage_takes_the_loss_by_name():
    assert _stage().loss == "bradley_terry"
    assert _stage(loss="plackett_luce").loss == "plackett_luce"
    with pytest.raises(ValidationError, match="bradley_terry"):
        _stage(loss="listwise")
    with pytest.raises(ValidationError, match="margin_column .* loss plackett_luce .* takes none"):
        _stage(loss="plackett_luce", train={"margin_column": "margin"})
