"""Token-level distillation losses (rlhf_core.losses.distillation): hand-computed values and gradients on
tiny vocabularies, the JSD's limits, the top-k-plus-tail form, masking of garbage padding."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.losses.distillation import (
    DIVERGENCES,
    TeacherTopK,
    distillation_loss,
    teacher_top_k,
    token_divergence,
    top_k_token_divergence,
)
from rlhf_core.losses.distillation_table import DIVERGENCE_NAMES

Q = [0.5, 0.3, 0.2]  # teacher next-token distribution on a 3-token vocabulary
P = [0.2, 0.2, 0.6]  # student


def logits_of(probs: list[float], requires_grad: bool = False) -> torch.Tensor:
    """(1, 1, V) float64 logits whose softmax is ``probs`` (log-probs are logits up to a constant)."""
    return torch.tensor([[[math.log(x) for x in probs]]], dtype=torch.float64, requires_grad=requires_grad)


def kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True))


def one_position(divergence: str, beta: float | None = None, temperature: float = 1.0, q=Q, p=P):
    """(value, d value / d student logits) at one trained position."""
    student = logits_of(p, requires_grad=True)
    value = token_divergence(
        student, logits_of(q), torch.ones(1, 1, dtype=torch.bool),
        divergence=divergence, beta=beta, temperature=temperature,
    )[0, 0]  # fmt: skip
    value.backward()
    return value.item(), student.grad[0, 0].tolist()


@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_zero_when_the_student_is_the_teacher(divergence) -> None:
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    full = token_divergence(logits.clone(), logits, mask, divergence=divergence, temperature=1.7)
    top = top_k_token_divergence(logits.clone(), teacher_top_k(logits, 3, 1.7), mask, divergence=divergence,
                                 temperature=1.7)  # fmt: skip
    assert full.abs().max().item() < 1e-12 and top.abs().max().item() < 1e-12


def test_forward_kl_by_hand_and_its_gradient() -> None:
    value, grad = one_position("forward_kl")
    # KL(q || p) = 0.5 ln(0.5/0.2) + 0.3 ln(0.3/0.2) + 0.2 ln(0.2/0.6) = 0.3601
    assert value == pytest.approx(kl(Q, P), abs=1e-12) and value == pytest.approx(0.36006, abs=1e-5)
    # word-level KD's cross-entropy -sum q log p differs by the teacher entropy H(q) only
    assert -sum(q * math.log(p) for q, p in zip(Q, P, strict=True)) == pytest.approx(
        value - sum(q * math.log(q) for q in Q)
    )
    # d KL(q || softmax(z)) / dz_v = p_v - q_v
    assert grad == pytest.approx([p - q for p, q in zip(P, Q, strict=True)], abs=1e-12)


def test_reverse_kl_by_hand_and_its_gradient() -> None:
    value, grad = one_position("reverse_kl")
    reverse = kl(P, Q)  # 0.2 ln(0.2/0.5) + 0.2 ln(0.2/0.3) + 0.6 ln(0.6/0.2) = 0.3948
    assert value == pytest.approx(reverse, abs=1e-12) and value == pytest.approx(0.39482, abs=1e-5)
    # d KL(softmax(z) || q) / dz_j = p_j (log p_j - log q_j - KL(p || q))
    expected = [p * (math.log(p / q) - reverse) for p, q in zip(P, Q, strict=True)]
    assert grad == pytest.approx(expected, abs=1e-12)


def test_generalized_jsd_by_hand_and_its_gradient() -> None:
    beta = 0.3
    value, grad = one_position("jsd", beta=beta)
    m = [beta * q + (1 - beta) * p for q, p in zip(Q, P, strict=True)]
    assert value == pytest.approx(beta * kl(Q, m) + (1 - beta) * kl(P, m), abs=1e-12)
    # dJSD/dp_v = (1 - beta) log(p_v / m_v) (the M-terms cancel: sum_v (beta q_v + (1-beta) p_v)/m_v
    # times dm_v is sum_v dm_v = 0); through the softmax, g_v = p_v (a_v - sum_u p_u a_u)
    a = [(1 - beta) * math.log(p / mv) for p, mv in zip(P, m, strict=True)]
    mean_a = sum(p * x for p, x in zip(P, a, strict=True))
    assert grad == pytest.approx([p * (x - mean_a) for p, x in zip(P, a, strict=True)], abs=1e-12)


def test_temperature_softens_both_distributions() -> None:
    value, _ = one_position("forward_kl", temperature=2.0)

    # softmax(log q / 2) is q^(1/2) renormalised
    def soft(xs: list[float]) -> list[float]:
        return [x**0.5 / sum(y**0.5 for y in xs) for x in xs]

    assert value == pytest.approx(kl(soft(Q), soft(P)), abs=1e-12)
    assert value < kl(Q, P)


def test_jsd_limits_are_forward_and_reverse_kl() -> None:
    forward, reverse = kl(Q, P), kl(P, Q)
    # JSD_beta / beta -> KL(teacher || student) as beta -> 0; / (1 - beta) -> KL(student || teacher) as
    # beta -> 1 (the next order is O(beta)), and the endpoints themselves are defined as those limits
    small = 1e-5
    assert one_position("jsd", beta=small)[0] / small == pytest.approx(forward, rel=1e-3)
    assert one_position("jsd", beta=1 - small)[0] / small == pytest.approx(reverse, rel=1e-3)
    assert one_position("jsd", beta=0.0) == one_position("forward_kl")
    assert one_position("jsd", beta=1.0) == one_position("reverse_kl")
    # symmetric in teacher and student at beta = 1/2, where it is the Jensen-Shannon divergence (<= ln 2)
    half = one_position("jsd", beta=0.5)[0]
    assert half == pytest.approx(one_position("jsd", beta=0.5, q=P, p=Q)[0], abs=1e-12)
    assert 0 < half < math.log(2)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        one_position("jsd", beta=1.5)


def test_top_k_with_a_small_k_by_hand() -> None:
    q, p = [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]
    teacher = teacher_top_k(logits_of(q), k=2)
    assert teacher.ids[0, 0].tolist() == [0, 1]
    student = logits_of(p, requires_grad=True)
    mask = torch.ones(1, 1, dtype=torch.bool)
    value = top_k_token_divergence(student, teacher, mask)[0, 0]
    # buckets: tokens 0, 1 and the tail {2, 3}: teacher [0.4, 0.3, 0.3], student [0.1, 0.2, 0.7]
    assert value.item() == pytest.approx(kl([0.4, 0.3, 0.3], [0.1, 0.2, 0.7]), abs=1e-12)
    value.backward()
    # d/dz_v of -sum_b q_b log p_b over buckets: p_v - q_b(v) p_v / p_b(v) for tail tokens
    expected = [0.1 - 0.4, 0.2 - 0.3, 0.3 - 0.3 * 0.3 / 0.7, 0.4 - 0.3 * 0.4 / 0.7]
    assert student.grad[0, 0].tolist() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_top_k_with_k_equal_to_the_vocabulary_is_the_full_form(divergence, dtype) -> None:
    torch.manual_seed(0)
    vocab = 6
    teacher_logits = torch.randn(2, 4, vocab, dtype=dtype) * 3
    mask = torch.ones(2, 4, dtype=torch.bool)
    grads, values = [], []
    for full in (True, False):
        student = torch.randn(2, 4, vocab, generator=torch.Generator().manual_seed(1), dtype=dtype) * 3
        student.requires_grad_(True)
        options = {"divergence": divergence, "beta": 0.4, "temperature": 1.3}
        if full:
            per_token = token_divergence(student, teacher_logits, mask, **options)
        else:
            top = teacher_top_k(teacher_logits, vocab, 1.3)
            per_token = top_k_token_divergence(student, top, mask, **options)
        distillation_loss(per_token, mask).backward()
        values.append(per_token.detach())
        grads.append(student.grad)
    # the tail bucket holds 0 mass up to rounding: floored at eps, no log(0), no nan
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    assert torch.isfinite(values[1]).all() and torch.isfinite(grads[1]).all()
    assert torch.allclose(values[1], values[0].to(values[1].dtype), atol=tolerance)
    assert torch.allclose(grads[1], grads[0], atol=tolerance)


GARBAGE = (float("nan"), float("inf"), -float("inf"), 1e30)


@pytest.mark.parametrize("divergence", list(DIVERGENCES))
@pytest.mark.parametrize("top_k", [None, 2])
def test_garbage_in_padding_changes_neither_value_nor_gradient(divergence, top_k) -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    results = []
    for garbage in (0.0, *GARBAGE):
        s, t = student.clone(), teacher.clone()
        s[~mask], t[~mask] = garbage, -garbage if garbage == garbage else garbage
        s.requires_grad_(True)
        if top_k is None:
            per_token = token_divergence(s, t, mask, divergence=divergence)
        else:
            top = teacher_top_k(t, top_k)
            ids = top.ids.clone()
            ids[~mask] = 10**9  # an id far outside the vocabulary: never gathered
            per_token = top_k_token_divergence(s, TeacherTopK(top.logprobs, ids), mask, divergence=divergence)
        loss = distillation_loss(per_token, mask)
        loss.backward()
        results.append((loss.item(), s.grad.clone()))
    clean_loss, clean_grad = results[0]
    assert math.isfinite(clean_loss) and clean_loss > 0
    assert clean_grad[~mask].abs().max().item() == 0.0  # padding gets no gradient
    for loss, grad in results[1:]:
        assert loss == clean_loss
        assert torch.equal(grad, clean_grad)


def test_the_reduction_is_a_mean_over_every_completion_token_of_the_batch() -> None:
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0, 10.0], [3.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    # token mean: (14 + 3) / 6, not the mean of the row means (2.8 + 3) / 2
    assert distillation_loss(per_token, mask).item() == pytest.approx(17 / 6)
    assert distillation_loss(per_token, torch.zeros_like(mask)).item() == 0.0


@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_gradients_reach_the_student_only(divergence) -> None:
    student = torch.randn(1, 3, 5, requires_grad=True)
    teacher = torch.randn(1, 3, 5, requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    distillation_loss(token_divergence(student, teacher, mask, divergence=divergence), mask).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    top = teacher_top_k(teacher, 2)
    assert not top.logprobs.requires_grad
    student.grad = None
    distillation_loss(top_k_token_divergence(student, top, mask, divergence=divergence), mask).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_the_spec_names_exactly_the_implemented_divergences() -> None:
    assert tuple(DIVERGENCES) == DIVERGENCE_NAMES == ("forward_kl", "reverse_kl", "jsd")
