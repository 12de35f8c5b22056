"""IPO on summed (the paper's, default) or per-token averaged (TRL's) log-ratios: values, gradients."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from rlhf_core.losses.direct_alignment import DIRECT_ALIGNMENT_LOSSES, ipo_loss
from rlhf_core.spec.stages.direct_alignment import DirectAlignmentStage
from rlhf_core.spec.stages.online_dpo import IterativeDPOTemplate
from rlhf_core.training.direct_alignment.trainer import step_losses


def _pair() -> tuple[torch.Tensor, ...]:
    """One pair, lengths |y_c| = 3, |y_r| = 5: Delta(y_c) = -6 - (-9) = 3, Delta(y_r) = -10 - (-5) = -5."""
    pi_c = torch.tensor([-6.0], dtype=torch.float64, requires_grad=True)
    pi_r = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    ref_c = torch.tensor([-9.0], dtype=torch.float64)
    ref_r = torch.tensor([-5.0], dtype=torch.float64)
    return pi_c, pi_r, ref_c, ref_r, torch.tensor([3]), torch.tensor([5])


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_at_initialisation_both_forms_give_the_squared_target(average, beta):
    """policy = reference: h = 0, L = (0 - 1/(2 beta))^2 (25 at beta 0.1), whatever the lengths."""
    logps = torch.tensor([-4.0, -17.5, -0.25], dtype=torch.float64)
    lengths_c, lengths_r = torch.tensor([2, 9, 1]), torch.tensor([7, 3, 4])
    result = ipo_loss(logps, logps.flip(0), logps, logps.flip(0), lengths_c, lengths_r, beta=beta)
    averaged = ipo_loss(
        logps, logps.flip(0), logps, logps.flip(0), lengths_c, lengths_r, beta=beta, average_log_probs=average
    )
    expected = (1 / (2 * beta)) ** 2
    assert result.losses.tolist() == pytest.approx([expected] * 3)
    assert averaged.losses.tolist() == pytest.approx([expected] * 3)


def test_summed_and_averaged_differ_by_hand():
    """beta 0.5, target 1.
    Summed: h = 3 - (-5) = 8, L = 49, dL/dpi_c = 2 (h - 1) = 14, dL/dpi_r = -14.
    Averaged: h = 3/3 - (-5/5) = 2, L = 1, dL/dpi_c = 2 (h - 1) / 3 = 2/3, dL/dpi_r = -2 (h - 1) / 5."""
    pi_c, pi_r, ref_c, ref_r, len_c, len_r = _pair()
    summed = ipo_loss(pi_c, pi_r, ref_c, ref_r, len_c, len_r, beta=0.5)
    assert summed.losses.tolist() == pytest.approx([49.0])
    assert [g.item() for g in torch.autograd.grad(summed.losses.sum(), (pi_c, pi_r))] == pytest.approx(
        [14, -14]
    )
    averaged = ipo_loss(pi_c, pi_r, ref_c, ref_r, len_c, len_r, beta=0.5, average_log_probs=True)
    assert averaged.losses.tolist() == pytest.approx([1.0])
    grads = torch.autograd.grad(averaged.losses.sum(), (pi_c, pi_r))
    assert [g.item() for g in grads] == pytest.approx([2 / 3, -2 / 5])
    # implicit rewards are per token when averaged: beta * Delta / |y|
    assert averaged.chosen_rewards.tolist() == pytest.approx([0.5])
    assert averaged.rejected_rewards.tolist() == pytest.approx([-0.5])


def test_averaged_gradient_equals_autograd_of_the_plain_formula():
    generator = torch.Generator().manual_seed(7)
    pi_c, pi_r, ref_c, ref_r = (
        -20 * torch.rand(5, generator=generator, dtype=torch.float64) for _ in range(4)
    )
    pi_c.requires_grad_(), pi_r.requires_grad_()
    len_c, len_r = (
        torch.randint(1, 30, (5,), generator=generator),
        torch.randint(1, 30, (5,), generator=generator),
    )
    beta = 0.2
    result = ipo_loss(pi_c, pi_r, ref_c, ref_r, len_c, len_r, beta=beta, average_log_probs=True)
    plain = ((pi_c - ref_c) / len_c - (pi_r - ref_r) / len_r - 1 / (2 * beta)) ** 2
    torch.testing.assert_close(result.losses, plain)
    got = torch.autograd.grad(result.losses.sum(), (pi_c, pi_r))
    want = torch.autograd.grad(plain.sum(), (pi_c, pi_r))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_averaging_without_lengths_is_refused():
    pi_c, pi_r, ref_c, ref_r, _, _ = _pair()
    with pytest.raises(ValueError, match="needs chosen_lengths and rejected_lengths"):
        ipo_loss(pi_c, pi_r, ref_c, ref_r, average_log_probs=True)


def _stage(**fields) -> DirectAlignmentStage:
    return DirectAlignmentStage(kind="direct_alignment", policy="p", data="d.preferences", **fields)


def test_the_stage_takes_the_switch_and_the_trainer_passes_it_on():
    """Default false (summed) is what ``resolved`` records; the trainer's step averages when asked."""
    assert _stage(loss="ipo").resolved().loss_options == {"average_log_probs": False}
    stage = _stage(loss="ipo", beta=0.5, loss_options={"average_log_probs": True}).resolved()
    assert stage.loss_options == {"average_log_probs": True}
    pi_c, pi_r, ref_c, ref_r, len_c, len_r = _pair()
    logps = torch.stack([pi_c, pi_r])  # (2, n): row 0 chosen, row 1 rejected, as the trainer's forward
    lengths = torch.stack([len_c, len_r])
    reference = torch.stack([ref_c, ref_r], dim=1)  # (n, 2): the cached reference log-probs
    spec = DIRECT_ALIGNMENT_LOSSES["ipo"]
    options = {"beta": stage.beta, **stage.loss_options}
    losses, _ = step_losses(spec, options, logps, lengths, reference)
    assert losses.tolist() == pytest.approx([1.0])
    losses, _ = step_losses(spec, {"beta": 0.5}, logps, lengths, reference)
    assert losses.tolist() == pytest.approx([49.0])


def test_a_number_typed_field_gives_the_switch_as_true():
    """The iterative-DPO template's loss_options hold numbers: a YAML `true` arrives as 1.0."""
    stage = IterativeDPOTemplate.model_validate(
        {
            "kind": "iterative_dpo",
            "policy": "p",
            "prompts": "d.prompts",
            "judge": [{"function": "arithmetic_exact"}],
            "loss": "ipo",
            "loss_options": {"average_log_probs": True},
        }  # fmt: skip
    )
    assert stage.loss_options == {"average_log_probs": True}


@pytest.mark.parametrize(
    ("loss", "options", "message"),
    [
        (
            "ipo",
            {"average_log_probs": 0.5},
            r"average_log_probs: 0.5 is refused for loss 'ipo': must be true or false",
        ),
        ("ipo", {"average_log_probs": "yes"}, r"loss_options.average_log_probs"),
        (
            "ipo",
            {"average_log_prob": True},
            r"loss 'ipo' has no such option \(did you mean average_log_probs\?",
        ),
        (
            "dpo",
            {"average_log_probs": True},
            r"average_log_probs: loss 'dpo' has no such option \(it takes: none\)",
        ),
        (
            "cdpo",
            {"label_smoothing": True},
            r"label_smoothing: true is refused for loss 'cdpo': must be a number",
        ),
    ],
)
def test_bad_switches_are_refused_when_the_stage_is_declared(loss, options, message):
    with pytest.raises(ValidationError, match=message):
        _stage(loss=loss, loss_options=options)
