"""KL(pi_theta || pi_ref) estimated from sampled tokens (per token, and per sample), and the adaptive
controller.

With y ~ pi_theta and d = log pi_ref(y_t) - log pi_theta(y_t) (the log of Schulman's r = pi_ref/pi_theta;
book ch.15 and the reference's section on KL estimators):

- k1 = -d = log pi_theta - log pi_ref      unbiased, high variance, can be negative
- k2 = d^2 / 2                             biased, low variance, >= 0
- k3 = (e^d - 1) - d                       unbiased, low variance, >= 0 (the RLHF/GRPO default)

k3 is computed as ``expm1(d) - d`` so it stays accurate near 0, where it is ~ d^2/2 (1e-4 -> 5e-9). The
direction matters: at log pi_theta - log pi_ref = 1 this gives e^-1 ~ 0.368; the reversed ratio
(0.718, used by some code) is not an estimator of KL(pi_theta || pi_ref).

:func:`sampled_kl` is the sequence-level k1 estimate that evaluation, the held-out KL of direct
alignment and the over-optimization monitor report: the summed log-ratio of each completion sampled
from pi_theta.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from rlhf_core.losses.masking import zero_padding

KLEstimator = Literal["k1", "k2", "k3"]


def _k1(d: torch.Tensor) -> torch.Tensor:
    return -d


def _k2(d: torch.Tensor) -> torch.Tensor:
    return 0.5 * d.square()


def _k3(d: torch.Tensor) -> torch.Tensor:
    return torch.expm1(d) - d


# estimator name -> its value as a function of d = log pi_ref - log pi_theta (module docstring)
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_per_token(
    logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """(B, T) per-token KL estimate from the policy's and the reference's log-probs of the sampled
    tokens; 0 outside ``mask`` (padding values never reach the exponential)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator '{estimator}' (known: {', '.join(KL_ESTIMATORS)})")
    return KL_ESTIMATORS[estimator](zero_padding(ref_logps - logps, mask))


def sampled_kl(
    logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B,) k1 estimates of KL(pi || pi_ref), one per completion y_i ~ pi(.|x_i) (book ch.15):

        KL_i = sum_t [ log pi(y_i,t | x_i, y_i,<t) - log pi_ref(y_i,t | x_i, y_i,<t) ]
        KL(pi || pi_ref) = E_{x, y ~ pi(.|x)} [ KL_i ]  ~  mean_i KL_i

    Args:
        logps, ref_logps: (B, T) log-probs of the sampled tokens under pi and pi_ref, summed over the
            ``mask`` positions; or (B,) log-probs of whole completions (already summed; ``mask`` None).
        mask: (B, T) True on completion tokens.

    Unbiased only for samples drawn from pi itself (temperature 1, no nucleus cut); a single estimate
    can be negative. Callers average it (over samples, or per prompt first).
    """
    if mask is None:
        return logps - ref_logps
    return torch.where(mask, logps - ref_logps, 0.0).sum(-1)


class AdaptiveKLController:
    """beta adapted toward a target KL (Ziegler et al. 2019; book ch.15):

        e_t = clip((KL_t - KL_target) / KL_target, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + K_beta * e_t * n_t / horizon)

    with n_t the number of samples of the step (``horizon`` in samples; TRL's form, which reduces to
    the reference's beta_t (1 + K_beta e_t) when n_t = horizon). Its state (``beta``) is saved with every
    checkpoint and restored on resume.
    """

    def __init__(self, initial_beta: float, target: float, horizon: int, gain: float = 0.1) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("the adaptive KL controller needs target > 0 and horizon > 0")
        self.beta = float(initial_beta)
        self.target, self.horizon, self.gain = float(target), int(horizon), float(gain)

    def update(self, kl: float, samples: int) -> float:
        if math.isfinite(kl):
            error = min(max((kl - self.target) / self.target, -0.2), 0.2)
            self.beta *= 1.0 + self.gain * error * samples / self.horizon
        return self.beta

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])


class FixedKLController:
    """A constant beta (modern practice: a small static beta, or 0 for RLVR)."""

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)

    def update(self, kl: float, samples: int) -> float:
        return self.beta

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])
