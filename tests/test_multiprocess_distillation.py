"""On-policy distillation (book ch.12) in two processes (``compute.processes``), launched by accelerate with
gloo on CPU: each rank scores its share of the rollout's groups with the teacher and the grids are
gathered, so 2 ranks log the loss, reward and reverse-KL curves of 1 process and end at its weights
(within float noise, as the other policy-gradient runs in ``test_multiprocess_policy_gradient``).

This file is also the script the ranks run (``accelerate launch <this file> ...``).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.stage_environment import StageEnvironment
from tests.test_multiprocess_policy_gradient import LOSS_ATOL, WEIGHT_ATOL
from tests.test_multiprocess_training import (
    DDP_SETTINGS,
    _load,
    _max_diff,
    _rank_main,
    launch_ranks,
    launched,
)

CURVE_KEYS = ("train/loss", "rollout/reward_mean", "rollout/distill/reverse_kl")
STAGES = {
    # unequal shares: 3 sampling chunks of 2 prompts, micro-batches of 5; the KL to the reference too
    "opd": {
        "kind": "policy_gradient", "algorithm": "grpo", "policy": "p", "prompts": "d.prompts",
        "distillation": {"teacher": "t", "coef": 0.5}, "kl": {"beta": 0.1},
        "rewards": [{"function": "tests.test_multiprocess_policy_gradient:digit_share"}],
        "truncated": "score",
        "rollouts": 2, "prompts_per_rollout": 6, "group_size": 4, "update_epochs": 1, "minibatches": 2,
        "generation": {"max_new_tokens": 8, "temperature": 1.0, "batch_size": 8},
        "train": {"lr": 5e-3, "batch_size": 5, "log_every": 1, "checkpoint_every": 100},
    },
}  # fmt: skip


def _train_distillation(name: str, policy_dir: str, work: Path, stop_after: int | None = None):
    """The policy_gradient stage body with the teacher saved beside the policy; returns (curve, policy)."""
    from rlhf_core.training.policy_gradient.stage import PolicyGradientInputs, optimize_on_rollouts

    curve: list[float] = []

    def log(metrics: dict[str, float], step: int) -> None:
        curve.extend(metrics[k] for k in CURVE_KEYS if k in metrics)

    records = synthetic_records("arithmetic", "prompts", n=20, seed=0)
    env = StageEnvironment(name, 0, work, work / "cache", work / "ckpt", log=log)
    teacher_dir = str(Path(policy_dir).parent / "teacher")
    inputs = PolicyGradientInputs(policy_dir, None, records, teacher_dir=teacher_dir)
    stage = PolicyGradientStage.model_validate(STAGES[name])
    return curve, optimize_on_rollouts(stage, inputs, env).model


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> str:
    """A tiny student; beside it a teacher with the same tokenizer and a re-drawn, sharper LM head."""
    from rlhf_core.modeling.models import build_tiny_model, save_model
    from rlhf_core.spec import TinyModelSource

    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    root = tmp_path_factory.mktemp("opd")
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        teacher.lm_head.weight.copy_(0.3 * torch.randn(teacher.lm_head.weight.shape, generator=generator))
    save_model(teacher, tokenizer, root / "teacher")
    return str(save_model(model, tokenizer, root / "student"))


def test_two_processes_distil_as_one(policy_dir, tmp_path_factory, tmp_path):
    out = launched(
        lambda: tmp_path_factory.mktemp("two"),
        lambda o, p, k: launch_ranks(__file__, DDP_SETTINGS, o, p, k),
        policy_dir,
        ",".join(STAGES),
    )
    torch.set_num_threads(1)
    one_curve, one_model = _train_distillation("opd", policy_dir, tmp_path / "opd")
    one_weights = {k: v.detach() for k, v in one_model.state_dict().items()}
    two_curve, two_weights = _load(out, "opd")
    assert len(two_curve) == len(one_curve) == 2 * (2 + 2)  # per rollout: reward, reverse KL, 2 losses
    worst_curve = max(abs(a - b) for a, b in zip(one_curve, two_curve, strict=True))
    print(f"opd: curves within {worst_curve:.2e}, weights within {_max_diff(one_weights, two_weights):.2e}")
    assert worst_curve <= LOSS_ATOL
    assert _max_diff(one_weights, two_weights) <= WEIGHT_ATOL
    assert one_curve[1] > 0.1  # the teacher differs: its term is not zero


if __name__ == "__main__":
    _rank_main(*sys.argv[1:], train=_train_distillation)
