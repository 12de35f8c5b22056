"""Masked reductions over completion tokens that stay finite whatever the padding holds.

Per-token tensors of on-policy RL are (B, T) with a (B, T) mask that is True on completion tokens.
Padding positions may hold anything (a stale log-prob, inf, NaN). Multiplying by the mask is not
enough: NaN * 0 is NaN, and even where() leaks NaN into the backward pass when the unselected branch
of a later function is non-finite. So every function here first replaces padding *inputs* by 0
(:func:`zero_padding`), then reduces.

The aggregation modes are the book's three (ch.6, "loss aggregation"):

1. ``sequence``: L = (1/B) sum_i (1/|a_i|) sum_t l_{i,t}  (per-sequence mean, then batch mean; GRPO)
2. ``token``:    L = sum_i sum_t l_{i,t} / sum_i |a_i|     (every token weighs the same; DAPO)
3. ``fixed_length``: L = (1/B) sum_i (1/L_max) sum_t l_{i,t}  (Dr. GRPO; L_max a constant from the
   config, not the padded width of the batch)

On the book's worked example, losses [1,1,1,1,10] and [1]*9 + [10] give 2.35, 2.2 and (with L_max 10)
contributions 1.4 and 1.9 (tested, gradients included).
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["sequence", "token", "fixed_length"]
AGGREGATIONS: tuple[str, ...] = ("sequence", "token", "fixed_length")


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with every position outside ``mask`` set to 0 (no gradient flows from those positions)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    clean = zero_padding(x, mask)
    return clean.sum() if dim is None else clean.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over mask positions (over all of them, or along ``dim``); 0 where the mask is empty."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: Aggregation,
    max_length: int | None = None,
) -> torch.Tensor:
    """One scalar loss from (B, T) per-token losses over the mask, by the book's ``mode`` (see above).

    ``fixed_length`` needs ``max_length`` (the configured generation limit L_max).
    """
    if mode == "sequence":
        return masked_mean(per_token, mask, dim=1).mean()
    if mode == "token":
        return masked_mean(per_token, mask)
    if mode == "fixed_length":
        if not max_length or max_length < 1:
            raise ValueError("fixed_length aggregation needs max_length (the generation limit L_max)")
        return (masked_sum(per_token, mask, dim=1) / max_length).mean()
    raise ValueError(f"unknown aggregation '{mode}' (known: {', '.join(AGGREGATIONS)})")
