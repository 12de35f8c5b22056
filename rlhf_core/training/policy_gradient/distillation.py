"""On-policy distillation (OPD, book ch.12) inside the policy-gradient loop.

The student samples a rollout; the teacher scores the sampled tokens like the reference model does (no
gradient, eval mode, its own log-probs at the rollout's token ids); every token the student wrote gets

    A_t^OPD = coef * (log pi_T(a_t | s_t) - log pi_old(a_t | s_t))      (Lu 2025)

with a stop-gradient on both log-probs (pi_old: the sampling policy's, recorded at the rollout). The
policy-gradient loss on this advantage follows the gradient of -KL(pi_theta || pi_T) on the student's own
samples (reverse KL: MiniLLM, GKD), one token at a time.

The term is added *after* the algorithm's estimator: GRPO's (r - mean) / std, RLOO's leave-one-out or
REINFORCE's batch baseline act on the rewards only, so normalisation never rescales the distillation
term and a group of equal rewards (advantage 0) still learns from the teacher. The result is (N, T): the
estimator's advantage on every token plus the term, 0 outside the mask (an environment's tokens in a
multi-turn episode carry neither).

Logged per rollout: ``distill/reverse_kl`` (mean over the student's tokens of log pi_old - log pi_T, an
estimate of the per-token reverse KL), ``distill/advantage_mean`` (the term's mean per token),
``distill/total_advantage_mean`` and ``time/teacher_s``.
"""

from __future__ import annotations

import contextlib
import time

import torch
from transformers import PreTrainedModel

from rlhf_core.losses.masking import masked_mean
from rlhf_core.modeling.completion_scoring import can_share_prefix
from rlhf_core.rollout.token_scoring import score_tokens
from rlhf_core.training.engine.data_parallel import rank_and_world
from rlhf_core.training.policy_gradient.rank_sharing import gather_objects
from rlhf_core.training.policy_gradient.rollouts import Rollout
from rlhf_core.training.policy_gradient.samples import Samples


def teacher_token_logprobs(
    teacher: PreTrainedModel, samples: Samples, pad_token_id: int, batch_size: int
) -> torch.Tensor:
    """(N, T) log pi_T of each sampled token (no gradient, eval mode), scored the way the reference is;
    with several processes rank r scores the groups g with g mod N = r and the grids are gathered."""
    rank, world = rank_and_world()
    n_groups = max(samples.groups, default=-1) + 1
    mine = list(range(rank, n_groups, world))
    part = samples if world == 1 else samples.select_groups(mine)
    grid = _score(teacher, part, pad_token_id, batch_size) if mine else None
    if world == 1:
        return grid
    full = torch.zeros(len(samples.lengths), max(samples.lengths))
    rows_of = {g: [i for i, gi in enumerate(samples.groups) if gi == g] for g in range(n_groups)}
    for owner, owned in enumerate(gather_objects(grid)):
        if owned is not None:
            rows = [i for g in range(owner, n_groups, world) for i in rows_of[g]]
            full[rows, : owned.shape[1]] = owned
    return full


def _score(teacher: PreTrainedModel, samples: Samples, pad_token_id: int, batch_size: int) -> torch.Tensor:
    # the teacher in the reference's place of score_tokens (its first argument only names the device)
    _, _, logps, _ = score_tokens(
        teacher, lambda: contextlib.nullcontext(teacher), None, samples.prompt_ids, samples.completion_ids,
        samples.groups, pad_token_id, can_share_prefix(teacher), batch_size, need_old=False,
    )  # fmt: skip
    return logps


def distillation_advantages(
    old_logps: torch.Tensor, teacher_logps: torch.Tensor, mask: torch.Tensor, coef: float
) -> torch.Tensor:
    """(N, T) coef * (log pi_T - log pi_old) on the student's tokens, 0 elsewhere (both stop-gradient)."""
    return torch.where(mask, coef * (teacher_logps - old_logps), 0.0).detach()


def with_distillation(advantages: torch.Tensor, distill: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, T) the estimator's advantages ((N,) per completion, broadcast, or (N, T)) plus the distillation
    term, 0 outside the mask."""
    per_token = advantages[:, None].expand_as(distill) if advantages.dim() == 1 else advantages
    return torch.where(mask, per_token.to(distill.dtype) + distill, 0.0)


class Distiller:
    """The teacher and its weight; turns a rollout's advantages into advantages with distillation."""

    def __init__(self, teacher: PreTrainedModel, coef: float, pad_token_id: int, batch_size: int) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.coef, self.pad_token_id, self.batch_size = coef, pad_token_id, batch_size

    def add_to(
        self, advantages: torch.Tensor, rollout: Rollout, policy: PreTrainedModel
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(advantages with the distillation term, the rollout's ``distill/...`` metrics); the teacher
        follows ``policy`` to its device."""
        if rollout.old_logps is None:
            raise ValueError("distillation needs pi_old at the rollout (Settings.need_old_pass)")
        started = time.perf_counter()
        self.teacher.to(next(policy.parameters()).device)
        samples, mask, old = rollout.samples, rollout.mask, rollout.old_logps
        teacher_logps = teacher_token_logprobs(self.teacher, samples, self.pad_token_id, self.batch_size)
        teacher_logps = teacher_logps[:, : mask.shape[1]]
        distill = distillation_advantages(old, teacher_logps, mask, self.coef)
        total = with_distillation(advantages, distill, mask)
        metrics = {
            "distill/reverse_kl": float(masked_mean(old - teacher_logps, mask)),
            "distill/advantage_mean": float(masked_mean(distill, mask)),
            "distill/total_advantage_mean": float(masked_mean(total, mask)),
            "time/teacher_s": time.perf_counter() - started,
        }
        return total, metrics
