"""Token-level knowledge distillation: divergences between a teacher's and a student's next-token
distributions at every completion position (book ch.12, "distillation").

Notation: pi_T the teacher, pi_theta the student, both read at position t of the same sequence (teacher
forcing). With tau the temperature, q_t = softmax(z^T_t / tau) and p_t = softmax(z^theta_t / tau):

- ``forward_kl``:  KL(q_t || p_t) = sum_v q_t(v) (log q_t(v) - log p_t(v)). Word-level KD of Kim & Rush
  (2016) minimises the cross-entropy -sum_v q_t(v) log p_t(v) = H(q_t) + KL(q_t || p_t); the teacher
  entropy H(q_t) does not depend on the student, so the two have the same gradient and differ by
  H(q_t) in value. Mode-covering.
- ``reverse_kl``:  KL(p_t || q_t) = sum_v p_t(v) (log p_t(v) - log q_t(v)). Mode-seeking; the loss of
  on-policy distillation (MiniLLM; GKD).
- ``jsd``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. for JSD(beta)),
  with P = q_t (teacher) and Q = p_t (student) and M = beta q_t + (1 - beta) p_t:
  JSD_beta = beta KL(q_t || M) + (1 - beta) KL(p_t || M), beta in [0, 1]. As beta -> 0,
  JSD_beta / beta -> KL(q_t || p_t) (forward); as beta -> 1, JSD_beta / (1 - beta) -> KL(p_t || q_t)
  (reverse). Convention here (as TRL's GKD trainer): for 0 < beta < 1 the value is the paper's,
  unscaled; beta = 0 and beta = 1 exactly give those limits, the forward and the reverse KL (the
  unscaled JSD would be identically 0 there).

Temperature divides both models' logits before the softmax; the loss is the divergence between the
softened distributions, with no tau^2 factor (Hinton et al. 2015 scale the gradient by tau^2; GKD and TRL
do not).

Top-k plus tail (``top_k_token_divergence``): only the teacher's k most likely tokens' log-probs and
ids (k = 20 in the book's companion code), plus one tail bucket log(1 - sum of those k probabilities);
the student's distribution is read at the same k ids plus its own tail bucket. Both are then
distributions over k + 1 outcomes and the divergence is taken between those (the companion's SDPO
loss is ``reverse_kl`` in this form). The teacher's full
vocabulary is never needed in the student's pass (its top-k can be precomputed: ``teacher_top_k``).
Tails below the float type's epsilon count as epsilon, so k = vocabulary size (tail mass 0 up to
rounding) gives the full-vocabulary value without a log(0).

Masks: every function takes a (B, T) ``mask``, True at the positions whose next-token distribution is
trained (completion tokens). Positions outside it may hold anything (nan, inf, 1e30) in either model's
logits: their inputs are replaced by finite values *before* any arithmetic, so they change neither the
value nor the gradient (a multiply by the mask would not do: nan * 0 is nan). Per-token values are 0
there.

Reduction (``distillation_loss``): the mean over all completion tokens of the batch,
sum_{i,t} m_{i,t} D_{i,t} / sum_{i,t} m_{i,t} (every token weighs the same; the book's "token"
aggregation, ch.6). Gradients flow to the student only: the teacher's inputs are detached.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf_core.losses.distillation_table import DEFAULT_JSD_BETA, DEFAULT_TOP_K, Divergence
from rlhf_core.losses.masking import masked_mean


def kl_divergence(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) over the last dimension, from log-probs (..., V).

    A term with p(v) = 0 (log p = -inf) is 0, with a zero gradient (no 0 * inf).
    """
    support = p_logp > -math.inf
    safe_p = torch.where(support, p_logp, 0.0)
    safe_q = torch.where(support, q_logp, 0.0)
    return torch.where(support, safe_p.exp() * (safe_p - safe_q), 0.0).sum(-1)


def forward_kl(
    teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float | None = None
) -> torch.Tensor:
    """KL(pi_T || pi_theta) per position: (..., V) log-probs -> (...). ``beta`` is unused."""
    return kl_divergence(teacher_logp, student_logp)


def reverse_kl(
    teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float | None = None
) -> torch.Tensor:
    """KL(pi_theta || pi_T) per position: (..., V) log-probs -> (...). ``beta`` is unused."""
    return kl_divergence(student_logp, teacher_logp)


def generalized_jsd(
    teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float | None = None
) -> torch.Tensor:
    """GKD's JSD_beta(pi_T || pi_theta) per position (module docstring: its convention and limits)."""
    beta = DEFAULT_JSD_BETA if beta is None else beta
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(teacher_logp, student_logp)
    if beta == 1.0:
        return reverse_kl(teacher_logp, student_logp)
    # log M = log(beta q + (1 - beta) p), in log space
    mixture = torch.logsumexp(
        torch.stack([teacher_logp + math.log(beta), student_logp + math.log1p(-beta)]), dim=0
    )
    return beta * kl_divergence(teacher_logp, mixture) + (1 - beta) * kl_divergence(student_logp, mixture)


DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor, float | None], torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
}
"""Loss name -> per-position divergence (teacher log-probs, student log-probs, beta) -> values."""


def _finite_where(mask: torch.Tensor, x: torch.Tensor, fill: float) -> torch.Tensor:
    """``x`` at mask positions, ``fill`` elsewhere; ``mask`` (B, T) broadcast over trailing dims."""
    while mask.dim() < x.dim():
        mask = mask.unsqueeze(-1)
    return torch.where(mask, x, torch.full((), fill, dtype=x.dtype, device=x.device))


def _softened_logp(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(z / tau) in float32 or wider, padding positions' logits first set to 0."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    clean = _finite_where(mask.bool(), logits.to(dtype), 0.0)
    return torch.log_softmax(clean / temperature, dim=-1)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    divergence: Divergence = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence between full next-token distributions.

    Args:
        student_logits: (B, T, V) logits of pi_theta (gradients flow through them).
        teacher_logits: (B, T, V) logits of pi_T (detached here).
        mask: (B, T) True where the position's next-token distribution is trained.
    Returns:
        (B, T) divergence D_{i,t} at temperature ``temperature``; 0 outside ``mask``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    mask = mask.bool()
    student_logp = _softened_logp(student_logits, mask, temperature)
    teacher_logp = _softened_logp(teacher_logits.detach(), mask, temperature)
    values = DIVERGENCES[divergence](teacher_logp, student_logp, beta)
    return torch.where(mask, values, 0.0)


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's k most likely next tokens at every position: log-probs (B, T, k) at the
    distillation temperature, and their token ids (B, T, k)."""

    logprobs: torch.Tensor
    ids: torch.Tensor


@torch.no_grad()
def teacher_top_k(
    teacher_logits: torch.Tensor, k: int = DEFAULT_TOP_K, temperature: float = 1.0
) -> TeacherTopK:
    """The teacher's top-k log-probs log softmax(z / tau) and ids per position, (B, T, V) -> (B, T, k);
    what a cache of teacher outputs would store instead of the whole vocabulary."""
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    logp = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return TeacherTopK(values, ids)


def _with_tail(top_logp: torch.Tensor) -> torch.Tensor:
    """(..., k) log-probs -> (..., k + 1): the k entries plus log(1 - sum of their probabilities).

    The tail mass is floored at the dtype's epsilon: below it, 1 - sum is rounding noise (k = V), and
    the floor keeps the log and its gradient finite.
    """
    eps = torch.finfo(top_logp.dtype).eps
    tail = (1.0 - top_logp.exp().sum(-1, keepdim=True)).clamp(min=eps)
    return torch.cat([top_logp, tail.log()], dim=-1)


def top_k_token_divergence(
    student_logits: torch.Tensor,
    teacher: TeacherTopK,
    mask: torch.Tensor,
    *,
    divergence: Divergence = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence over the teacher's top-k tokens plus one tail bucket (module docstring).

    Args:
        student_logits: (B, T, V) logits of pi_theta.
        teacher: the teacher's (B, T, k) top-k log-probs (at ``temperature``) and ids.
        mask: (B, T) True where the position is trained.
    Returns:
        (B, T) divergence between the two (k + 1)-bucket distributions; 0 outside ``mask``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    mask = mask.bool()
    k = teacher.ids.shape[-1]
    ids = _finite_where(mask, teacher.ids, 0).long()  # padding may hold any id; gather needs a valid one
    # padding positions: a uniform teacher over the k + 1 buckets, finite in every step below
    teacher_logp = _with_tail(_finite_where(mask, teacher.logprobs.detach(), -math.log(k + 1)))
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    scaled = _finite_where(mask, student_logits.to(dtype), 0.0) / temperature  # (B, T, V)
    # selective log-softmax: z[id] - logsumexp(z), never the full (B, T, V) log-probs
    student_top = scaled.gather(-1, ids) - torch.logsumexp(scaled, dim=-1, keepdim=True)
    student_logp = _with_tail(student_top)
    values = DIVERGENCES[divergence](teacher_logp.to(student_logp.dtype), student_logp, beta)
    return torch.where(mask, values, 0.0)


def distillation_loss(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The batch's loss: mean of the (B, T) per-token divergences over every completion token
    (sum_{i,t} m D / sum_{i,t} m; 0 for an empty mask)."""
    return masked_mean(per_token, mask.bool())
