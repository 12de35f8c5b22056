"""Plackett-Luce listwise reward-model loss and the ranking that a prompt's pairs imply."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.losses.reward_model import bradley_terry_loss, plackett_luce_loss, ranking_from_pairs

GARBAGE = (float("nan"), float("inf"), -float("inf"), 1e30)


def test_two_completions_give_bradley_terry():
    """K = 2: -log(e^{r_c} / (e^{r_c} + e^{r_r})) - log(e^{r_r} / e^{r_r}) = -log sigma(r_c - r_r)."""
    r_c = torch.tensor([1.5, -0.3, 2.0], dtype=torch.float64)
    r_r = torch.tensor([0.5, 0.7, 2.0], dtype=torch.float64)
    # columns in either order: the order tensor says which one is best
    rewards = torch.stack([r_r, r_c], dim=1)
    order = torch.tensor([[1, 0]] * 3)
    loss = plackett_luce_loss(rewards, torch.ones(3, 2, dtype=torch.bool), order)
    torch.testing.assert_close(loss, bradley_terry_loss(r_c, r_r))


def test_hand_value_for_three_and_its_gradient():
    """sigma = (a, b, c) with r = (2, 1, 0): L = -(2 - log(e^2 + e + 1)) - (1 - log(e + 1)) - 0.
    dL/dr_a = p_a - 1 with p_a = e^2 / (e^2 + e + 1); dL/dr_b = p'_b - 1 + e / (e^2 + e + 1),
    p'_b = e / (e + 1); dL/dr_c = 1 / (e^2 + e + 1) + 1 / (e + 1). The gradients sum to 0 (a shift
    of all rewards changes nothing)."""
    e = math.e
    z1, z2 = e**2 + e + 1, e + 1
    rewards = torch.tensor([[0.0, 2.0, 1.0]], dtype=torch.float64, requires_grad=True)  # columns c, a, b
    order = torch.tensor([[1, 2, 0]])
    loss = plackett_luce_loss(rewards, torch.ones(1, 3, dtype=torch.bool), order)
    expected = -(2 - math.log(z1)) - (1 - math.log(z2))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, rewards)
    want_a, want_b = e**2 / z1 - 1, e / z2 - 1 + e / z1
    want_c = 1 / z1 + 1 / z2
    assert grad[0].tolist() == pytest.approx([want_c, want_a, want_b], rel=1e-12)


def test_at_initialisation_it_is_log_k_factorial_per_prompt():
    """Equal rewards: every ranking of K has probability 1 / K!; prompts of K = 3 and K = 2 average."""
    rewards = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    order = torch.tensor([[2, 0, 1], [1, 0, 2]])
    assert plackett_luce_loss(rewards, mask, order).item() == pytest.approx((math.log(6) + math.log(2)) / 2)


@pytest.mark.parametrize("garbage", GARBAGE)
def test_padded_completions_change_neither_value_nor_gradient(garbage):
    """A prompt with 2 real completions padded to K = 4 gives its K = 2 value; padding gets no gradient,
    wherever the order puts the padded columns."""
    real = torch.tensor([[0.4, -1.1]], dtype=torch.float64)
    alone = plackett_luce_loss(real, torch.ones(1, 2, dtype=torch.bool), torch.tensor([[1, 0]]))
    padded = torch.tensor([[garbage, 0.4, garbage, -1.1]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, True, False, True]])
    for order in ([[3, 1, 0, 2]], [[0, 3, 2, 1]]):
        loss = plackett_luce_loss(padded, mask, torch.tensor(order))
        torch.testing.assert_close(loss, alone)
        (grad,) = torch.autograd.grad(loss, padded)
        assert grad[0, 0].item() == 0.0 and grad[0, 2].item() == 0.0
        assert torch.isfinite(grad).all()


def test_gradient_matches_autograd_of_a_plain_loop():
    generator = torch.Generator().manual_seed(5)
    rewards = torch.randn(4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    order = torch.stack([torch.randperm(5, generator=generator) for _ in range(4)])
    loss = plackett_luce_loss(rewards, torch.ones(4, 5, dtype=torch.bool), order)
    plain = 0.0
    for b in range(4):
        ranked = rewards[b, order[b]]
        plain = plain - sum(ranked[k] - torch.logsumexp(ranked[k:], 0) for k in range(5))
    plain = plain / 4
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(torch.autograd.grad(loss, rewards)[0], torch.autograd.grad(plain, rewards)[0])


def test_pairs_imply_a_total_order():
    # 3 beats 0 beats 2 beats 1, given as all C(4, 2) pairs in any order
    pairs = [(0, 2), (3, 1), (2, 1), (3, 0), (0, 1), (3, 2)]
    assert ranking_from_pairs(4, pairs) == [3, 0, 2, 1]
    # a chain is enough: transitivity orders the rest
    assert ranking_from_pairs(3, [(2, 0), (0, 1)]) == [2, 0, 1]


@pytest.mark.parametrize(
    ("n", "pairs", "message"),
    [
        (3, [(0, 1), (1, 2), (2, 0)], r"contradict each other \(a cycle among completions \[0, 1, 2\]\)"),
        (3, [(0, 1), (0, 2)], r"do not order completions 1 and 2 against each other"),
        (2, [(1, 1)], r"completion 1 is both chosen and rejected"),
    ],
)
def test_pairs_that_imply_no_total_order_are_refused(n, pairs, message):
    with pytest.raises(ValueError, match=message):
        ranking_from_pairs(n, pairs)
