"""Train/inference mismatch: how far the sampler's log-probs are from the learner's, and truncated
importance sampling (TIS) to correct for it (book ch.6 / methods reference section 7.6).

A fast inference engine (vLLM) and the trainer compute log pi(y_t | x, y_<t) with different kernels, so
even with identical weights the sampler's distribution pi^sampler differs a little from the learner's
pi^learner. Tokens are sampled from pi^sampler, while the policy-gradient loss assumes pi^learner_old.

- Mismatch, per token t of the sampled completions (sampled from pi^sampler):
    r_t = log pi^learner_old(y_t) - log pi^sampler(y_t)
    KL(pi^sampler || pi^learner) ~ E[-r_t]            (k1, unbiased, can be negative)
                                 ~ E[exp(r_t) - 1 - r_t]  (k3, unbiased and >= 0)
- TIS weight: rho~_t = min(exp(r_t), C); the per-token PPO/GRPO loss is multiplied by it (detached):
    J = E[ min(rho^policy_t A_t, clip(rho^policy_t, 1 - eps, 1 + eps) A_t) * rho~_t ]
  with rho^policy = pi_theta / pi^learner_old recomputed on the learner (so it captures only the policy's
  drift). Open Instruct uses C = 2. r_t is clamped to [-10, 10] before exp, as the reference code does.

Padding positions may hold anything (inf, NaN): they are zeroed before use (:mod:`.masking`).
"""

from __future__ import annotations

import torch

from rlhf_core.losses.masking import masked_mean, zero_padding

LOG_RATIO_CLAMP = 10.0


def log_ratio(learner_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) r_t = log pi^learner - log pi^sampler on completion tokens, 0 on padding."""
    return zero_padding(learner_logps, mask) - zero_padding(sampler_logps, mask)


def truncated_importance_weights(
    learner_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """(B, T) rho~_t = min(exp(clamp(r_t, -10, 10)), C), detached; 0 on padding."""
    r = log_ratio(learner_logps.detach(), sampler_logps.detach(), mask)
    weights = torch.exp(r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).clamp(max=cap)
    return zero_padding(weights, mask)


def mismatch_metrics(
    learner_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, cap: float | None = None
) -> dict[str, float]:
    """Token means of the mismatch between sampler and learner (``kl_k1``, ``kl_k3``), the largest
    |r_t|, and, with a cap, the mean TIS weight and the share of tokens whose ratio the cap cut."""
    r = log_ratio(learner_logps.detach().double(), sampler_logps.detach().double(), mask)
    clamped = r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    out = {
        "kl_k1": float(masked_mean(-r, mask)),
        "kl_k3": float(masked_mean(torch.expm1(clamped) - clamped, mask)),
        "max_abs_log_ratio": float(zero_padding(r.abs(), mask).max()) if mask.any() else 0.0,
    }
    if cap is not None:
        weights = truncated_importance_weights(learner_logps, sampler_logps, mask, cap)
        out["tis_weight_mean"] = float(masked_mean(weights.double(), mask))
        out["tis_capped_share"] = float(masked_mean((clamped.exp() > cap).double(), mask))
    return out
