"""Direct alignment losses (book ch.8): DPO and its family, trained offline on preference data.

Notation (book): x the prompt, y_c / y_r the chosen / rejected completion, pi_theta the policy, pi_ref
the frozen reference, beta the temperature. For a completion y:

    Delta(y) = log pi_theta(y|x) - log pi_ref(y|x)        (log-ratio; beta * Delta is DPO's implicit reward)
    h        = Delta(y_c) - Delta(y_r)
    avg(y)   = log pi_theta(y|x) / |y|                     (per-token average over the completion)

DPO (Rafailov 2023) in short: the KL-regularised objective max_pi E[r] - beta KL(pi || pi_ref) has the
optimum pi*(y|x) = pi_ref(y|x) exp(r(x,y)/beta) / Z(x) (Gibbs); inverted, r(x,y) = beta log(pi*/pi_ref)
+ beta log Z(x). Put into Bradley-Terry, Z(x) cancels, and the preference NLL is a loss on the policy
alone: L_DPO = -log sigma(beta h).

Every loss takes per-SEQUENCE quantities of shape (B,): log pi(y|x) summed over the completion's tokens
(prompt and padding masked; see ``rlhf_core.losses.language_model.sequence_logprobs``) and, where it
needs averages, the completion's token count |y| (>= 1: an empty completion has no average). It
returns per-example losses (B,) (the caller reduces, usually by the mean) and detached implicit
rewards for logging. Hyperparameters are
keyword-only, defaulting to the book's companion configs (reference/rlhf-methods.md §9.4).
``DIRECT_ALIGNMENT_LOSSES`` maps the names a stage accepts to the functions; the names, which need a
reference model, beta and the other options with their defaults and ranges are declared once, in
``rlhf_core.losses.direct_alignment_table`` (torch-free: the spec reads it).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rlhf_core.losses.direct_alignment_table import DIRECT_ALIGNMENT_TABLE


@dataclass(frozen=True)
class PreferenceLoss:
    """Result of a paired loss. All tensors (B,); rewards and metrics are detached."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class UnpairedPreferenceLoss:
    """Result of KTO: losses, rewards and labels (B,) per example; ``metrics["kl"]`` is z_0 (scalar)."""

    losses: torch.Tensor
    rewards: torch.Tensor
    desirable: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def chosen_rewards(self) -> torch.Tensor:
        """(n_D,) rewards of the desirable examples."""
        return self.rewards[self.desirable]

    @property
    def rejected_rewards(self) -> torch.Tensor:
        """(n_U,) rewards of the undesirable examples."""
        return self.rewards[~self.desirable]


def _rewarded(
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    **metrics: torch.Tensor,
) -> PreferenceLoss:
    return PreferenceLoss(
        losses,
        chosen_rewards.detach(),
        rejected_rewards.detach(),
        {name: value.detach() for name, value in metrics.items()},
    )


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceLoss:
    """DPO: L = -log sigma(beta h), h = Delta(y_c) - Delta(y_r) (Rafailov 2023, arXiv:2305.18290, eq. 7).

    Gradient: dL/dlog pi_theta(y_c|x) = -beta sigma(r_r - r_c), with r = beta Delta the implicit reward:
    pairs the implicit reward model orders wrongly weigh the most. ln 2 at initialisation.

    Args: four (B,) summed completion log-probs of the policy and the reference.
    Returns: losses (B,); rewards beta * Delta(y) (B,).
    """
    delta_c = policy_chosen_logps - reference_chosen_logps
    delta_r = policy_rejected_logps - reference_rejected_logps
    losses = -F.logsigmoid(beta * (delta_c - delta_r))
    return _rewarded(losses, beta * delta_c, beta * delta_r)


def cdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> PreferenceLoss:
    """Conservative DPO: a fraction eps of the labels is assumed flipped (Mitchell 2023, a note on DPO).

    L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h); eps = 0 is DPO. ln 2 at initialisation.

    Args: as ``dpo_loss``. Returns: losses (B,); rewards beta * Delta(y) (B,).
    """
    delta_c = policy_chosen_logps - reference_chosen_logps
    delta_r = policy_rejected_logps - reference_rejected_logps
    logits = beta * (delta_c - delta_r)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return _rewarded(losses, beta * delta_c, beta * delta_r)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    average_log_probs: bool = False,
) -> PreferenceLoss:
    """IPO (Azar et al. 2023, arXiv:2310.12036): L = (h - 1/(2 beta))^2, regressing h onto a target margin.

    Default (``average_log_probs=False``): h from SUMMED completion log-probs, the paper's form: its
    derivation regresses the log-likelihood ratio of whole completions, log pi(y|x) = sum of the tokens'.
    With ``average_log_probs=True`` (TRL's ``ipo``), each log-ratio is divided by its completion's length:
    h = Delta(y_c) / |y_c| - Delta(y_r) / |y_r|. Both give (1/(2 beta))^2 at initialisation (25 at
    beta = 0.1, the value the book's companion reports), but elsewhere the summed h is ~|y| times larger,
    so the same beta regresses onto a far smaller per-token margin; summed stays the default so beta
    means what the paper and the companion configs mean (reference/rlhf-methods.md §25).

    Args: as ``dpo_loss``, plus the (B,) completion token counts |y_c|, |y_r| (needed only to average).
    Returns: losses (B,); rewards beta * Delta(y) (B,), per token when averaged.
    """
    delta_c = policy_chosen_logps - reference_chosen_logps
    delta_r = policy_rejected_logps - reference_rejected_logps
    if average_log_probs:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo_loss with average_log_probs=True needs chosen_lengths and rejected_lengths")
        delta_c, delta_r = delta_c / chosen_lengths, delta_r / rejected_lengths
    losses = (delta_c - delta_r - 1 / (2 * beta)) ** 2
    return _rewarded(losses, beta * delta_c, beta * delta_r)


def dpo_norm_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
) -> PreferenceLoss:
    """Length-normalized DPO (Tulu 3): DPO on per-token AVERAGE log-probs of policy and reference.

    L = -log sigma(beta [(log pi_theta(y_c) - log pi_ref(y_c)) / |y_c| - (... y_r) / |y_r|]).
    The averages are tiny next to sums, hence beta = 2.0 instead of 0.1.

    Args: four (B,) summed log-probs and the (B,) completion token counts |y_c|, |y_r|.
    Returns: losses (B,); rewards beta * Delta(y) / |y| (B,).
    """
    return dpo_loss(
        policy_chosen_logps / chosen_lengths,
        policy_rejected_logps / rejected_lengths,
        reference_chosen_logps / chosen_lengths,
        reference_rejected_logps / rejected_lengths,
        beta=beta,
    )


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
) -> PreferenceLoss:
    """SimPO, reference-free (Meng et al. 2024, arXiv:2405.14734).

    L = -log sigma(beta (avg(y_c) - avg(y_r) - g)).
    Parametrised as SimPO's own code and the book's companion: the target margin is given as the ratio
    g = gamma / beta, so the paper's margin is gamma = beta * g (1.0 with the defaults beta 2.0, g 0.5).

    Args: (B,) summed policy log-probs and (B,) completion token counts.
    Returns: losses (B,); rewards beta * avg(y) (B,), SimPO's implicit reward.
    """
    avg_c = policy_chosen_logps / chosen_lengths
    avg_r = policy_rejected_logps / rejected_lengths
    losses = -F.logsigmoid(beta * (avg_c - avg_r - gamma_beta_ratio))
    return _rewarded(losses, beta * avg_c, beta * avg_r)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate at both ends (Maechler 2012).

    Near 0, 1 - exp(a) cancels: use log(-expm1(a)). Far below, exp(a) underflows: use log1p(-exp(a)).
    """
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    odds_ratio_weight: float = 0.1,
) -> PreferenceLoss:
    """ORPO (Hong et al. 2024, arXiv:2403.07691), reference-free: SFT plus an odds-ratio preference term.

    L = -avg(y_c) - lambda log sigma(log odds(y_c) - log odds(y_r)),  odds(y) = p / (1 - p),
    with p = exp(avg(y)) the per-token average probability (as the companion code and TRL), so
    log odds(y) = avg(y) - log(1 - exp(avg(y))). The NLL is the chosen completion's per-token mean (the
    paper's; TRL also counts prompt tokens). lambda = ``odds_ratio_weight`` (TRL and the companion call
    it beta). Averages are clamped just below 0, where the odds are infinite.

    Args: (B,) summed policy log-probs and (B,) completion token counts.
    Returns: losses (B,); rewards lambda * avg(y) (B,) as the companion code logs them; metrics
        ``sft_loss``, ``or_loss`` (lambda-weighted) and ``log_odds_ratio`` (B,).
    """
    avg_c = (policy_chosen_logps / chosen_lengths).clamp(max=-1e-6)
    avg_r = (policy_rejected_logps / rejected_lengths).clamp(max=-1e-6)
    log_odds_ratio = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    sft_loss = -avg_c
    or_loss = -odds_ratio_weight * F.logsigmoid(log_odds_ratio)
    return _rewarded(
        sft_loss + or_loss,
        odds_ratio_weight * avg_c,
        odds_ratio_weight * avg_r,
        sft_loss=sft_loss,
        or_loss=or_loss,
        log_odds_ratio=log_odds_ratio,
    )


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    reference_kl_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> UnpairedPreferenceLoss:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306) on unpaired thumbs-up / thumbs-down completions.

    L(x, y) = lambda_D (1 - sigma(beta (Delta(y) - z_0)))   if y is desirable,
              lambda_U (1 - sigma(beta (z_0 - Delta(y))))   if y is undesirable,
    z_0 = max(0, mean_i [log pi_theta(y'_i|x_i) - log pi_ref(y'_i|x_i)]), detached: the KL reference
    point, estimated on MISMATCHED pairs (x_i, y'_i), e.g. completions rolled by one in the batch so that
    y'_i = y_{i-1} (the companion code; the paper draws separate samples). A multi-device stage should
    average the mismatched log-ratios over all devices. Averaging ``losses`` over the batch gives 0.5 at
    initialisation with unit weights (the paper's and TRL's reduction).

    Args:
        policy_logps, reference_logps: (B,) summed completion log-probs.
        desirable: (B,) bool or 0/1, 1 for a desirable completion.
        policy_kl_logps, reference_kl_logps: (M,) summed log-probs of the mismatched completions.
    Returns: losses (B,); rewards beta * Delta(y) (B,); ``metrics["kl"]`` = z_0.
    """
    desirable = desirable.bool()
    delta = policy_logps - reference_logps
    z0 = (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (delta - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - delta))),
    )
    return UnpairedPreferenceLoss(losses, (beta * delta).detach(), desirable, {"kl": z0})


def apo_zero_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceLoss:
    """APO-zero: Delta(y_c) up and Delta(y_r) down, each on its own (D'Oosterlinck 2024, arXiv:2408.06266).

    L = -sigma(beta Delta(y_c)) + sigma(beta Delta(y_r)); 0 at initialisation (TRL adds the constant 1).
    For data whose chosen completions are better than the model's own.

    Args: as ``dpo_loss``. Returns: losses (B,); rewards beta * Delta(y) (B,).
    """
    delta_c = policy_chosen_logps - reference_chosen_logps
    delta_r = policy_rejected_logps - reference_rejected_logps
    losses = -torch.sigmoid(beta * delta_c) + torch.sigmoid(beta * delta_r)
    return _rewarded(losses, beta * delta_c, beta * delta_r)


def apo_down_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceLoss:
    """APO-down: both likelihoods go down, the rejected one more (D'Oosterlinck 2024, arXiv:2408.06266).

    L = sigma(beta Delta(y_c)) - sigma(beta h); 0 at initialisation (TRL adds the constant 1).
    For data whose chosen completions are worse than the model's own.

    Args: as ``dpo_loss``. Returns: losses (B,); rewards beta * Delta(y) (B,).
    """
    delta_c = policy_chosen_logps - reference_chosen_logps
    delta_r = policy_rejected_logps - reference_rejected_logps
    losses = torch.sigmoid(beta * delta_c) - torch.sigmoid(beta * (delta_c - delta_r))
    return _rewarded(losses, beta * delta_c, beta * delta_r)


def dpo_nll_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
) -> PreferenceLoss:
    """DPO + NLL (iterative RPO, Pang et al. 2024, arXiv:2404.19733).

    L = L_DPO - alpha log pi_theta(y_c|x) / |y_c|.
    The DPO term uses summed log-probs; the NLL is the chosen completion's per-token mean, per sequence
    (the paper's; TRL pools tokens over the batch). |y_c| counts all completion tokens (chain of thought
    and answer). alpha = 1 as in the paper.

    Args: as ``dpo_loss``, plus the (B,) chosen completion token counts.
    Returns: losses (B,); rewards beta * Delta(y) (B,); metric ``nll`` (B,).
    """
    dpo = dpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta=beta,
    )
    nll = -policy_chosen_logps / chosen_lengths
    return _rewarded(dpo.losses + alpha * nll, dpo.chosen_rewards, dpo.rejected_rewards, nll=nll)


@dataclass(frozen=True)
class LossSpec:
    """A direct-alignment loss as a stage sees it."""

    fn: Callable[..., PreferenceLoss | UnpairedPreferenceLoss]
    needs_reference: bool  # False: the stage loads no reference model
    paired: bool = True  # False: unpaired examples with a desirable label (KTO)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Names of the tensor arguments, in order."""
        parameters = inspect.signature(self.fn).parameters.values()
        return tuple(p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD)

    @property
    def hyperparameters(self) -> dict[str, float]:
        """Keyword-only hyperparameters and their defaults."""
        parameters = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY}


DIRECT_ALIGNMENT_LOSSES: dict[str, LossSpec] = {
    name: LossSpec(globals()[loss.function], loss.needs_reference, loss.paired)
    for name, loss in DIRECT_ALIGNMENT_TABLE.items()
}
"""Loss name -> function, built from the declarations in ``direct_alignment_table``."""
