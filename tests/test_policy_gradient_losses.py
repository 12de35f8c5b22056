"""On-policy RL estimators and losses against hand-derived values (the book's worked examples, ch.6 and
ch.15), with padding positions holding garbage that must never reach a sum, a mean or a gradient."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.losses.advantages import (
    all_equal_groups,
    batch_baseline_advantages,
    generalized_advantages,
    group_advantages,
    sequence_kl,
    sequence_rewards_to_tokens,
    whiten,
)
from rlhf_core.losses.kl import AdaptiveKLController, kl_per_token, sampled_kl
from rlhf_core.losses.masking import aggregate_loss
from rlhf_core.losses.policy_gradient import (
    cispo_loss,
    clipped_surrogate_loss,
    clipped_value_loss,
    gspo_loss,
    reinforce_loss,
    soft_overlong_penalty,
)

GARBAGE = (float("nan"), float("inf"), -float("inf"), 1e30)


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def _spoil(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with its padding positions filled with NaN, inf, -inf and huge values, in turn."""
    out = x.detach().clone()
    pads = (~mask).nonzero().tolist()
    for k, (i, j) in enumerate(pads):
        out[i, j] = GARBAGE[k % len(GARBAGE)]
    return out.requires_grad_(x.requires_grad)


# ------------------------------------------------------------------------------------ loss aggregation


def test_the_books_aggregation_example():
    mask = _mask([5, 10], 10)
    losses = torch.ones(2, 10)
    losses[0, 4], losses[1, 9] = 10.0, 10.0
    losses = _spoil(losses, mask)
    assert aggregate_loss(losses, mask, "sequence").item() == pytest.approx(2.35)
    assert aggregate_loss(losses, mask, "token").item() == pytest.approx(2.2)
    # fixed length L_max = 10: contributions 1.4 and 1.9, batch mean 1.65
    assert aggregate_loss(losses[:1], mask[:1], "fixed_length", 10).item() == pytest.approx(1.4)
    assert aggregate_loss(losses[1:], mask[1:], "fixed_length", 10).item() == pytest.approx(1.9)
    assert aggregate_loss(losses, mask, "fixed_length", 10).item() == pytest.approx(1.65)
    with pytest.raises(ValueError, match="max_length"):
        aggregate_loss(losses, mask, "fixed_length")


def test_the_books_aggregation_gradients():
    """ratio = 1, A = 2, masks of 4 and 7 tokens, max_gen_len 7 (reference section 7.4)."""
    mask = _mask([4, 7], 8)

    def grads(mode: str, with_advantage: bool = True, **kw) -> tuple[float, torch.Tensor]:
        ratio = _spoil(torch.ones(2, 8), mask).requires_grad_()
        per_token = ratio * 2.0 if with_advantage else ratio
        loss = aggregate_loss(per_token, mask, mode, **kw)
        (grad,) = torch.autograd.grad(loss, ratio)
        assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
        return loss.item(), grad

    value, grad = grads("sequence")
    assert value == pytest.approx(2.0)
    assert grad[0, 0].item() == pytest.approx(0.25) and grad[1, 0].item() == pytest.approx(2 / 14)
    value, grad = grads("fixed_length", max_length=7)
    assert value == pytest.approx((8 / 7 + 2.0) / 2)  # per sequence [1.1429, 2.0]
    assert grad[mask].tolist() == pytest.approx([1 / 7] * 11)
    value, grad = grads("token", with_advantage=False)
    assert value == pytest.approx(1.0)
    assert grad[mask].tolist() == pytest.approx([1 / 11] * 11)  # the book's 0.0909


# ------------------------------------------------------------------------------------------ advantages


def test_gae_on_a_hand_computed_trajectory():
    """r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma 1, lambda 0.95:
    delta = [0.1, 0.1, 0.3]; A_2 = 0.3, A_1 = 0.1 + 0.95 * 0.3 = 0.385, A_0 = 0.1 + 0.95 * 0.385 = 0.46575.
    Row 2 (gamma 0.9, lambda 0.5, two tokens, r = [0.2, -1], V = [1, 2]): delta_1 = -1 - 2 = -3,
    delta_0 = 0.2 + 0.9 * 2 - 1 = 1.0; A_1 = -3, A_0 = 1.0 + 0.45 * -3 = -0.35."""
    mask = _mask([3, 2], 4)
    rewards = _spoil(torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.2, -1.0, 0.0, 0.0]]), mask)
    values = _spoil(torch.tensor([[0.5, 0.6, 0.7, 0.0], [1.0, 2.0, 0.0, 0.0]]), mask)
    first, returns = generalized_advantages(rewards[:1], values[:1], mask[:1], gamma=1.0, lam=0.95)
    assert first[0].tolist() == pytest.approx([0.46575, 0.385, 0.3, 0.0])
    assert returns[0].tolist() == pytest.approx([0.96575, 0.985, 1.0, 0.0])
    second, _ = generalized_advantages(rewards[1:], values[1:], mask[1:], gamma=0.9, lam=0.5)
    assert second[0].tolist() == pytest.approx([-0.35, -3.0, 0.0, 0.0])


def test_gae_limits_are_monte_carlo_and_td():
    generator = torch.Generator().manual_seed(0)
    mask = _mask([6, 3, 5], 7)
    rewards = _spoil(torch.randn(3, 7, generator=generator), mask)
    values = _spoil(torch.randn(3, 7, generator=generator), mask)
    clean_r, clean_v = torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0)
    mc, _ = generalized_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = clean_r.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(mc, torch.where(mask, reward_to_go - clean_v, 0.0))
    td, _ = generalized_advantages(rewards, values, mask, gamma=0.9, lam=0.0)
    next_v = torch.cat([clean_v[:, 1:], torch.zeros(3, 1)], dim=1) * torch.cat(
        [mask[:, 1:], torch.zeros(3, 1, dtype=torch.bool)], dim=1
    )
    torch.testing.assert_close(td, torch.where(mask, clean_r + 0.9 * next_v - clean_v, 0.0))


def test_rloo_equals_dr_grpo_times_g_over_g_minus_1_and_leave_one_out():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.25, 3.0, -1.0])
    g = 4
    rloo = group_advantages(rewards, g, "rloo")
    dr = group_advantages(rewards, g, "dr_grpo")
    torch.testing.assert_close(rloo, dr * g / (g - 1))
    grouped = rewards.view(-1, g)
    leave_one_out = grouped - (grouped.sum(1, keepdim=True) - grouped) / (g - 1)
    torch.testing.assert_close(rloo, leave_one_out.reshape(-1))
    grpo = group_advantages(rewards, g, "grpo").view(-1, g)
    torch.testing.assert_close(grpo.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    assert grpo.std(1).tolist() == pytest.approx([1.0, 1.0], abs=1e-3)  # std + 1e-4 in the denominator
    assert group_advantages(torch.tensor([1.0, 0.0]), 2, "grpo").tolist() == pytest.approx(
        [0.5 / (math.sqrt(0.5) + 1e-4), -0.5 / (math.sqrt(0.5) + 1e-4)]
    )  # unbiased std
    torch.testing.assert_close(batch_baseline_advantages(rewards), rewards - rewards.mean())


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_an_all_equal_group_has_zero_advantage_and_zero_gradient(estimator):
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert all_equal_groups(rewards, 4).tolist() == [True, False]
    advantages = group_advantages(rewards, 4, estimator)
    assert advantages[:4].tolist() == [0.0] * 4
    mask = _mask([3, 4, 2, 4, 4, 1, 2, 3], 5)
    logps = (-torch.rand(8, 5, generator=torch.Generator().manual_seed(1))).requires_grad_()
    loss = clipped_surrogate_loss(logps, logps.detach(), advantages, mask, 0.2, 0.2)
    aggregate_loss(loss.per_token, mask, "sequence").backward()
    assert (logps.grad[:4] == 0).all() and (logps.grad[4:][mask[4:]] != 0).any()


def test_group_estimators_reject_groups_of_one():
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.tensor([1.0, 0.0]), 1, "grpo")
    with pytest.raises(ValueError, match="do not split"):
        group_advantages(torch.tensor([1.0, 0.0, 2.0]), 2, "rloo")


def test_whiten_and_rewards_on_the_last_token():
    mask = _mask([2, 3], 4)
    values = _spoil(torch.tensor([[1.0, 3.0, 0, 0], [2.0, 4.0, 6.0, 0]]), mask)
    white = whiten(values, mask)
    assert torch.isfinite(white).all() and (white[~mask] == 0).all()
    assert white[mask].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert white[mask].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    tokens = sequence_rewards_to_tokens(torch.tensor([5.0, -1.0]), mask)
    assert tokens.tolist() == [[0, 5.0, 0, 0], [0, 0, -1.0, 0]]


# -------------------------------------------------------------------------------------- KL estimators


def test_k3_direction_and_small_values():
    mask = torch.ones(1, 1, dtype=torch.bool)
    logp, ref = torch.tensor([[0.0]]), torch.tensor([[-1.0]])  # log pi - log pi_ref = 1
    assert kl_per_token(logp, ref, mask, "k3").item() == pytest.approx(math.exp(-1))  # 0.3679, not e - 2
    assert kl_per_token(logp, ref, mask, "k1").item() == pytest.approx(1.0)
    assert kl_per_token(logp, ref, mask, "k2").item() == pytest.approx(0.5)
    small = torch.tensor([[1e-4]], dtype=torch.float64)
    tiny = kl_per_token(small, torch.zeros_like(small), mask)
    assert tiny.item() == pytest.approx(0.5e-8, rel=1e-3)  # expm1 keeps it accurate near 0


def test_k1_and_k3_are_unbiased_k2_and_k3_nonnegative():
    """Exact expectations over a small categorical policy: E_pi[k1] = E_pi[k3] = KL(pi || pi_ref)."""
    pi = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    true_kl = (pi * (pi.log() - ref.log())).sum()
    mask = torch.ones(1, 4, dtype=torch.bool)
    for estimator in ("k1", "k3"):
        per = kl_per_token(pi.log()[None], ref.log()[None], mask, estimator)[0]
        assert (pi * per).sum().item() == pytest.approx(true_kl.item(), rel=1e-12)
    for estimator in ("k2", "k3"):
        assert (kl_per_token(pi.log()[None], ref.log()[None], mask, estimator) >= 0).all()


def test_kl_ignores_garbage_padding_in_value_and_gradient():
    mask = _mask([2, 3], 4)
    logps = _spoil(-torch.rand(2, 4, generator=torch.Generator().manual_seed(2)), mask).requires_grad_()
    ref = _spoil(-torch.rand(2, 4, generator=torch.Generator().manual_seed(3)), mask)
    for estimator in ("k1", "k2", "k3"):
        per = kl_per_token(logps, ref, mask, estimator)
        (grad,) = torch.autograd.grad(aggregate_loss(per, mask, "token"), logps)
        assert torch.isfinite(per).all() and torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    sums = sequence_kl(kl_per_token(logps, ref, mask, "k1"), mask, "sum")
    clean = torch.where(mask, logps - ref, 0.0).sum(1)
    torch.testing.assert_close(sums, clean)


def test_adaptive_controller_moves_beta_toward_the_target_and_resumes():
    controller = AdaptiveKLController(initial_beta=0.1, target=6.0, horizon=10_000)
    assert controller.update(kl=12.0, samples=10_000) == pytest.approx(0.1 * (1 + 0.1 * 0.2))  # error capped
    assert controller.update(kl=5.4, samples=10_000) == pytest.approx(0.102 * (1 - 0.1 * 0.1))
    restored = AdaptiveKLController(initial_beta=0.5, target=6.0, horizon=10_000)
    restored.load_state_dict(controller.state_dict())
    assert restored.beta == controller.beta


# ------------------------------------------------------------------------------------- policy losses


@pytest.mark.parametrize(
    ("advantage", "ratio", "gradient_is_zero"),
    [
        (1.0, 1.5, True),  # A > 0, rho > 1 + eps: clipped, no gradient
        (-1.0, 0.5, True),  # A < 0, rho < 1 - eps: clipped, no gradient
        (1.0, 0.5, False),  # A > 0, rho < 1 - eps: the unclipped term is the smaller objective
        (-1.0, 1.5, False),  # A < 0, rho > 1 + eps: likewise
        (1.0, 1.1, False),  # inside the clip range
        (-1.0, 0.9, False),
    ],
)
def test_ppo_clip_regions(advantage, ratio, gradient_is_zero):
    mask = torch.ones(1, 1, dtype=torch.bool)
    old = torch.tensor([[-1.0]])
    logps = (old + math.log(ratio)).requires_grad_()
    loss = clipped_surrogate_loss(logps, old, torch.tensor([advantage]), mask, 0.2, 0.2)
    (grad,) = torch.autograd.grad(loss.per_token.sum(), logps)
    assert (grad.item() == 0.0) is gradient_is_zero
    assert loss.clipped.item() is gradient_is_zero
    expected_objective = min(ratio * advantage, min(max(ratio, 0.8), 1.2) * advantage)
    assert loss.per_token.item() == pytest.approx(-expected_objective)
    if not gradient_is_zero:
        assert grad.item() == pytest.approx(-advantage * ratio)  # d(-A rho)/d log pi


def test_ratio_one_gives_the_reinforce_gradient_and_garbage_stays_out():
    mask = _mask([3, 5, 1], 6)
    generator = torch.Generator().manual_seed(4)
    logps = _spoil(-torch.rand(3, 6, generator=generator), mask).requires_grad_()
    advantages = torch.tensor([1.5, -0.5, 2.0])
    old = _spoil(logps.detach(), mask)
    grads = {}
    for name, loss in {
        "clipped": clipped_surrogate_loss(logps, old, advantages, mask, 0.2, 0.28),
        "cispo": cispo_loss(logps, old, advantages, mask, 0.2, 0.4),
        "reinforce": reinforce_loss(logps, advantages, mask),
    }.items():
        assert torch.isfinite(loss.per_token).all() and not loss.clipped.any()
        (grads[name],) = torch.autograd.grad(aggregate_loss(loss.per_token, mask, "sequence"), logps)
        assert torch.isfinite(grads[name]).all() and (grads[name][~mask] == 0).all()
    torch.testing.assert_close(grads["clipped"], grads["reinforce"])
    torch.testing.assert_close(grads["cispo"], grads["reinforce"])


def test_gspo_uses_the_length_normalized_sequence_ratio():
    mask = _mask([2, 4], 4)
    old = _spoil(torch.tensor([[-1.0, -2.0, 0, 0], [-1.0, -1.0, -1.0, -1.0]]), mask)
    shift = torch.tensor([[0.2, 0.0, 0, 0], [0.4, 0.4, 0.0, 0.0]])
    logps = _spoil(old.detach() + shift, mask).requires_grad_()
    advantages = torch.tensor([1.0, -1.0])
    loss = gspo_loss(logps, old, advantages, mask, 0.3, 0.3)
    s = torch.exp(torch.tensor([0.1, 0.2]))  # mean log-ratio per sequence
    assert loss.per_token[0, :2].tolist() == pytest.approx([-s[0].item()] * 2)  # unclipped, A > 0
    assert loss.per_token[1, :4].tolist() == pytest.approx([s[1].item()] * 4)
    (grad,) = torch.autograd.grad(aggregate_loss(loss.per_token, mask, "sequence"), logps)
    # d/d logp_t of -A s_i = -A s_i / |a_i|, per token, halved by the batch mean
    assert grad[0, :2].tolist() == pytest.approx([-s[0].item() / 2 / 2] * 2)
    assert grad[1, :4].tolist() == pytest.approx([s[1].item() / 4 / 2] * 4)
    tight = gspo_loss(logps, old, advantages, mask, 0.05, 0.05)
    assert tight.clipped[0, :2].all() and (tight.clipped[~mask] == False).all()  # noqa: E712


def test_cispo_keeps_a_gradient_on_clipped_tokens():
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = torch.tensor([[-1.0, -1.0]])
    logps = (old + torch.tensor([[math.log(2.0), math.log(1.1)]])).requires_grad_()
    loss = cispo_loss(logps, old, torch.tensor([1.0]), mask, 0.2, 0.4)
    assert loss.clipped.tolist() == [[True, False]]
    (grad,) = torch.autograd.grad(loss.per_token.sum(), logps)
    assert grad.tolist()[0] == pytest.approx([-1.4, -1.1])  # -sg(clip(rho)) * A


def test_value_loss_clipping():
    mask = _mask([2], 3)
    old = torch.tensor([[1.0, 1.0, 0.0]])
    returns = _spoil(torch.tensor([[2.0, 0.0, 0.0]]), mask)
    values = _spoil(torch.tensor([[1.5, 1.0, 0.0]]), mask).requires_grad_()
    loss = clipped_value_loss(values, old, returns, mask, clip=0.2)
    # token 0: V 1.5 clipped to 1.2: max(0.5 * 0.25, 0.5 * 0.64) = 0.32, no gradient through V
    assert loss[0, :2].tolist() == pytest.approx([0.32, 0.5])
    (grad,) = torch.autograd.grad(loss.sum(), values)
    assert grad[0].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert clipped_value_loss(values, old, returns, mask, clip=None)[0, 0].item() == pytest.approx(0.125)


def test_dapo_soft_overlong_penalty():
    lengths = torch.tensor([100, 384, 448, 512, 513])
    assert soft_overlong_penalty(lengths, 512, 128).tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


def test_sampled_kl_sums_each_completions_log_ratios_over_its_tokens():
    """Completion 0: log-ratios 0.5 and -0.25 -> 0.25; completion 1: one token, 1.0 (its padding, whatever
    its values, counts for nothing). Whole-completion log-probs (no mask) give their difference."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, 7.0]])
    ref = torch.tensor([[-1.5, -1.75], [-1.5, -9.0]])
    mask = torch.tensor([[True, True], [True, False]])
    assert sampled_kl(logps, ref, mask).tolist() == [0.25, 1.0]
    assert sampled_kl(logps.sum(1), ref.sum(1)).tolist() == [0.25, 17.0]
    assert sampled_kl(ref, ref, mask).tolist() == [0.0, 0.0]  # pi = pi_ref
