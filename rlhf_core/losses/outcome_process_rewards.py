"""Outcome and process reward-model losses (book ch.5, sections on ORMs and PRMs).

An outcome reward model (ORM) has a scalar logit w_theta(s_t) at every token and predicts, at each
completion token, the probability p_theta(s_t) = sigma(w_theta(s_t)) that the whole completion is
correct. Its training label r in {0, 1} is the completion's correctness, copied to every completion
token (prompt tokens carry no label):

    token form (Lightman et al. 2023, the canonical ORM loss):
        L = -E_y[ (1/T) sum_t  r log p_theta(s_t) + (1 - r) log(1 - p_theta(s_t)) ]
    sequence form (Lyu et al. 2025): the sigmoid comes AFTER the mean of the logits,
        p_bar = sigma( (1/T) sum_t w_theta(s_t) ),   L = -E_y[ r log p_bar + (1 - r) log(1 - p_bar) ]

T is the number of completion tokens of each sequence: each sequence's tokens are averaged first, then
the sequences. A process reward model (PRM) scores each reasoning step at the token that ends it (the
last token of the step separator):

    binary (Lightman et al. 2023):
        L_PRM = -E[ sum_i y_i log r_theta(s_i | x, s_<i) + (1 - y_i) log(1 - r_theta(s_i | x, s_<i)) ]
    three classes (PRM800K ratings -1 / 0 / +1 -> classes 0 / 1 / 2): cross-entropy at each step end.

Both PRM forms are averaged over all the labelled steps of the batch (the practical form: per-step mean,
so the loss at initialisation does not grow with the number of steps). With a zero head every logit is
0, so every form equals ln 2 (binary) or ln 3 (three classes) at initialisation.

Positions outside the mask never enter: their logits are replaced by zeros before any arithmetic, so
padding holding NaN, inf or 1e30 changes neither the loss nor the gradient (masks, not -100 labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` with every position outside ``mask`` set to 0 (no NaN or inf survives there)."""
    while mask.dim() < values.dim():
        mask = mask.unsqueeze(-1)
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _per_sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean of ``values`` (B, T) over each row's masked positions (1/T_i of the book's formula)."""
    counts = mask.sum(-1).clamp(min=1)
    return _masked(values, mask).sum(-1) / counts


def orm_token_loss(
    logits: torch.Tensor, correct: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """ORM token form: BCE of every completion token against its sequence's outcome label.

    Args:
        logits: (B, T) per-token logits w_theta(s_t).
        correct: (B,) outcome labels r in {0, 1} (float or bool).
        completion_mask: (B, T) bool, True at the completion tokens that carry the label.
    Returns:
        scalar: mean over sequences of (1/T_i) sum_t BCE(w_t, r_i).
    """
    safe = _masked(logits, completion_mask)  # (B, T)
    targets = correct.to(safe.dtype).unsqueeze(-1).expand_as(safe)  # r copied to every token
    per_token = F.binary_cross_entropy_with_logits(safe, targets, reduction="none")  # (B, T)
    return _per_sequence_mean(per_token, completion_mask).mean()


def orm_sequence_loss(
    logits: torch.Tensor, correct: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """ORM sequence form: BCE of sigma(mean_t w_theta(s_t)), the sigmoid after the mean of the logits.

    Args:
        logits: (B, T) per-token logits.
        correct: (B,) outcome labels r in {0, 1}.
        completion_mask: (B, T) bool completion tokens.
    Returns:
        scalar: mean over sequences of BCE((1/T_i) sum_t w_t, r_i).
    """
    mean_logit = _per_sequence_mean(logits, completion_mask)  # (B,)
    return F.binary_cross_entropy_with_logits(mean_logit, correct.to(mean_logit.dtype))


def prm_binary_loss(logits: torch.Tensor, step_labels: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """PRM binary form: BCE at each step-end token, averaged over all labelled steps of the batch.

    Args:
        logits: (B, T) per-token logits; only step-end positions are read.
        step_labels: (B, T) 1 for a good step, 0 for a bad one, at the step-end positions (anything
            elsewhere).
        step_mask: (B, T) bool, True at the step-end positions.
    Returns:
        scalar: mean over the steps of -[y log sigma(w) + (1 - y) log(1 - sigma(w))].
    """
    safe = _masked(logits, step_mask)
    targets = _masked(step_labels.to(safe.dtype), step_mask)
    per_token = F.binary_cross_entropy_with_logits(safe, targets, reduction="none")  # (B, T)
    return _masked(per_token, step_mask).sum() / step_mask.sum().clamp(min=1)


def prm_three_class_loss(
    logits: torch.Tensor, step_labels: torch.Tensor, step_mask: torch.Tensor
) -> torch.Tensor:
    """PRM three-class form: cross-entropy at each step-end token, ratings -1/0/+1 as classes 0/1/2.

    Args:
        logits: (B, T, 3) per-token class logits.
        step_labels: (B, T) ratings in {-1, 0, +1} at the step-end positions (anything elsewhere).
        step_mask: (B, T) bool, True at the step-end positions.
    Returns:
        scalar: mean over the steps of -log softmax(logits)[rating + 1].
    """
    safe = _masked(logits, step_mask)  # (B, T, 3)
    classes = torch.where(step_mask, step_labels.long() + 1, torch.zeros_like(step_labels, dtype=torch.long))
    per_token = F.cross_entropy(safe.flatten(0, 1), classes.flatten(), reduction="none").view_as(classes)
    return _masked(per_token, step_mask).sum() / step_mask.sum().clamp(min=1)


def step_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """P(good step) from PRM head logits (..., C): sigma(w) for a binary head (C = 1), the probability
    of class +1 for a three-class head (C = 3; a neutral step counts as not good)."""
    if logits.shape[-1] == 3:
        return torch.softmax(logits.float(), dim=-1)[..., 2]
    return torch.sigmoid(logits.float().squeeze(-1))
