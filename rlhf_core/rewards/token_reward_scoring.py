"""Rewards r(x, y) from an outcome or a process reward model (book ch.5): per-token probabilities
p_t (ORM) or per-step probabilities q_i (PRM), aggregated into one score by
:mod:`rlhf_core.rewards.token_aggregation`.

A completion is split into steps by the separator its PRM was trained with (kept in the model's config);
one without the separator is one step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.losses.outcome_process_rewards import step_probabilities
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.modeling.token_reward_model import (
    SEPARATOR_KEY,
    encode_outcome,
    encode_steps,
    pad_rows,
    split_steps,
    token_logits,
)
from rlhf_core.rewards.token_aggregation import aggregate_outcome, aggregate_steps


@torch.no_grad()
def probabilities_at(
    model: PreTrainedModel,
    sequences: list[list[int]],
    positions: list[list[int]],
    pad_token_id: int,
    batch_size: int = 32,
) -> list[list[float]]:
    """P(correct / good) read at ``positions[i]`` of each sequence, batched in length order. The model
    scores in eval mode and goes back in the mode it came in."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[list[float]] = [[] for _ in sequences]
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            part = order[start : start + batch_size]
            ids, real = pad_rows([sequences[i] for i in part], pad_token_id)
            probs = step_probabilities(token_logits(model, ids.to(device), real.to(device))).cpu()  # (B, T)
            for row, i in enumerate(part):
                out[i] = probs[row, positions[i]].tolist()
    return out


def outcome_probabilities(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple]
) -> list[list[float]]:
    """p_t over the completion tokens (and the turn end) of each (prompt, completion)."""
    encoded = [encode_outcome(tokenizer, prompt, completion) for prompt, completion in pairs]
    positions = [list(range(e.start, len(e.ids))) for e in encoded]
    return probabilities_at(model, [e.ids for e in encoded], positions, tokenizer.pad_token_id)


def step_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, solutions: list[tuple], separator: str
) -> list[list[float]]:
    """q_i at every step end of each (prompt, steps)."""
    encoded = [encode_steps(tokenizer, prompt, steps, separator) for prompt, steps in solutions]
    return probabilities_at(
        model, [e.ids for e in encoded], [e.step_ends for e in encoded], tokenizer.pad_token_id
    )


def token_reward_scorer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, kind: str, options: dict
) -> Callable[[list[tuple]], list[float]]:
    """A scorer of (prompt, completion) batches with an ORM (``kind='outcome'``) or a PRM, aggregated
    as ``options`` say (already checked by :func:`check_scoring_options`)."""
    if kind == "outcome":
        return lambda pairs: [
            aggregate_outcome(p, options["aggregation"], options["last_m"])
            for p in outcome_probabilities(model, tokenizer, pairs)
        ]
    separator = getattr(model.config, SEPARATOR_KEY)
    return lambda pairs: [
        aggregate_steps(q, options["aggregation"])
        for q in step_scores(model, tokenizer, [(x, split_steps(y, separator)) for x, y in pairs], separator)
    ]
