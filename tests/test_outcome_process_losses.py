"""ORM and PRM losses (book ch.5): values at initialisation, hand-derived values and gradients, the
sequence form against the token form, and padding garbage that must change nothing."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.losses.outcome_process_rewards import (
    orm_sequence_loss,
    orm_token_loss,
    prm_binary_loss,
    prm_three_class_loss,
    step_probabilities,
)

# two sequences: row 0 has 3 completion tokens (positions 1..3), row 1 has 2 (positions 2..3)
MASK = torch.tensor([[False, True, True, True, False], [False, False, True, True, False]])
CORRECT = torch.tensor([1.0, 0.0])


def _logits() -> torch.Tensor:
    return torch.tensor([[9.0, 0.5, -1.0, 2.0, 7.0], [-4.0, 3.0, 1.5, -0.5, 8.0]], requires_grad=True)


def _bce(w: float, r: float) -> float:
    p = 1 / (1 + math.exp(-w))
    return -(r * math.log(p) + (1 - r) * math.log(1 - p))


def test_every_form_is_ln2_or_ln3_with_a_zero_head():
    zeros = torch.zeros(2, 5)
    assert orm_token_loss(zeros, CORRECT, MASK).item() == pytest.approx(math.log(2), abs=1e-7)
    assert orm_sequence_loss(zeros, CORRECT, MASK).item() == pytest.approx(math.log(2), abs=1e-7)
    assert prm_binary_loss(zeros, torch.ones(2, 5), MASK).item() == pytest.approx(math.log(2), abs=1e-7)
    ratings = torch.tensor([[0, -1, 0, 1, 0], [0, 0, 1, -1, 0]])
    assert prm_three_class_loss(torch.zeros(2, 5, 3), ratings, MASK).item() == pytest.approx(
        math.log(3), abs=1e-7
    )


def test_orm_token_loss_averages_tokens_per_sequence_then_sequences():
    logits = _logits()
    loss = orm_token_loss(logits, CORRECT, MASK)
    # row 0 (r = 1): mean of BCE(0.5), BCE(-1), BCE(2) against 1; row 1 (r = 0): BCE(1.5), BCE(-0.5) vs 0
    row0 = (_bce(0.5, 1) + _bce(-1.0, 1) + _bce(2.0, 1)) / 3
    row1 = (_bce(1.5, 0) + _bce(-0.5, 0)) / 2
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    loss.backward()
    # d/dw_t = (sigma(w_t) - r) / T_i / B at completion tokens, 0 elsewhere
    sig = torch.sigmoid(logits.detach())
    expected = torch.zeros(2, 5)
    expected[0, 1:4] = (sig[0, 1:4] - 1) / 3 / 2
    expected[1, 2:4] = (sig[1, 2:4] - 0) / 2 / 2
    assert torch.allclose(logits.grad, expected, atol=1e-7)


def test_orm_sequence_form_takes_the_sigmoid_after_the_mean_and_differs_from_the_token_form():
    logits = _logits()
    loss = orm_sequence_loss(logits, CORRECT, MASK)
    mean0, mean1 = (0.5 - 1.0 + 2.0) / 3, (1.5 - 0.5) / 2  # 0.5 and 0.5
    assert loss.item() == pytest.approx((_bce(mean0, 1) + _bce(mean1, 0)) / 2, abs=1e-6)
    # the token form on the same numbers is another value: sigma is not linear
    assert abs(loss.item() - orm_token_loss(logits, CORRECT, MASK).item()) > 0.05
    loss.backward()
    expected = torch.zeros(2, 5)
    expected[0, 1:4] = (torch.sigmoid(torch.tensor(mean0)) - 1) / 3 / 2
    expected[1, 2:4] = (torch.sigmoid(torch.tensor(mean1)) - 0) / 2 / 2
    assert torch.allclose(logits.grad, expected, atol=1e-7)


def test_prm_binary_loss_is_the_mean_bce_over_all_labelled_steps():
    logits = _logits()
    step_mask = torch.tensor([[False, True, False, True, False], [False, False, False, True, False]])
    labels = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]])
    loss = prm_binary_loss(logits, labels, step_mask)
    expected = (_bce(0.5, 1) + _bce(2.0, 0) + _bce(-0.5, 1)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    auto = logits.detach().clone().requires_grad_(True)
    torch.nn.functional.binary_cross_entropy_with_logits(auto[step_mask], labels[step_mask]).backward()
    loss.backward()
    assert torch.allclose(logits.grad, auto.grad, atol=1e-7)


def test_prm_three_class_loss_maps_ratings_to_classes_and_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, requires_grad=True)
    step_mask = torch.tensor([[False, True, False, True, False], [False, False, True, True, False]])
    ratings = torch.tensor([[0, -1, 0, 1, 0], [0, 0, 0, -1, 0]])
    loss = prm_three_class_loss(logits, ratings, step_mask)
    # -log softmax at class rating + 1, by hand for the four labelled steps
    logp = torch.log_softmax(logits.detach(), -1)
    hand = -(logp[0, 1, 0] + logp[0, 3, 2] + logp[1, 2, 1] + logp[1, 3, 0]) / 4
    assert loss.item() == pytest.approx(hand.item(), abs=1e-6)
    auto = logits.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(auto[step_mask], ratings[step_mask] + 1).backward()
    loss.backward()
    assert torch.allclose(logits.grad, auto.grad, atol=1e-7)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_padding_garbage_changes_neither_value_nor_gradient(garbage):
    clean = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
    dirty = clean.clone()
    dirty[~MASK] = garbage
    ratings = torch.tensor([[0, -1, 0, 1, 0], [0, 0, 1, -1, 0]])
    labels = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]])
    forms = [
        lambda x: orm_token_loss(x[..., 0], CORRECT, MASK),
        lambda x: orm_sequence_loss(x[..., 0], CORRECT, MASK),
        lambda x: prm_binary_loss(x[..., 0], labels, MASK),
        lambda x: prm_three_class_loss(x, ratings, MASK),
    ]
    for form in forms:
        a, b = clean.clone().requires_grad_(True), dirty.clone().requires_grad_(True)
        la, lb = form(a), form(b)
        la.backward()
        lb.backward()
        assert torch.isfinite(lb) and lb.item() == pytest.approx(la.item(), abs=1e-6)
        assert torch.equal(a.grad, b.grad) and not b.grad[~MASK].any()


def test_step_probabilities_read_the_good_class():
    assert step_probabilities(torch.zeros(4, 1)).tolist() == [0.5] * 4
    three = torch.tensor([[0.0, 0.0, math.log(2.0)]])  # softmax = 1/4, 1/4, 1/2
    assert step_probabilities(three).tolist() == pytest.approx([0.5])
