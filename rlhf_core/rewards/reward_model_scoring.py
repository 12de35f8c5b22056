"""Rewards r(x, y) from a reward model (book ch.5): a scalar read at each sequence's end-of-turn token.

Used for training the reward model (pairs of a prompt scored in one forward pass), for held-out
evaluation, and as a reward source of the sample, label_preferences and evaluate stages and of
on-policy loops (``load_reward_model_scorer``, which also scores outcome and process reward models,
:mod:`rlhf_core.rewards.token_reward_scoring`). By default the sequences of a prompt are scored in one
row that holds the prompt once (:mod:`rlhf_core.modeling.shared_prefix`); that gives the same rewards
as one right-padded row per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_core.data.schemas import prompt_key
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.modeling.preference_tokens import PromptPairs, encode_completion, pad_batch
from rlhf_core.modeling.shared_prefix import pack_shared_prefix, score_shared_prefix, supports_shared_prefix
from rlhf_core.modeling.token_reward_model import reward_kind
from rlhf_core.rewards.composite import ModelScorer
from rlhf_core.rewards.token_aggregation import check_scoring_options
from rlhf_core.rewards.token_reward_scoring import token_reward_scorer


def score_sequences(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) scalar rewards r(x, y) of right-padded rows, read at each row's last real token.

    The position comes from the attention mask, not from the pad id, so it is the end-of-turn token
    even when a tokenizer pads with its EOS. Models without a ``score`` head use transformers' pooling.
    """
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or model.base_model is model:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    hidden = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # (B, T, H)
    last = batch["attention_mask"].sum(-1) - 1
    return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).squeeze(-1)


def score_groups(
    model: PreTrainedModel,
    groups: list[list[list[int]]],
    pad_token_id: int,
    device: torch.device,
    shared_prefix: bool = True,
) -> tuple[torch.Tensor, int]:
    """Rewards of every sequence, flattened group by group, and the tokens the model processed.

    Each group holds the token sequences of one prompt. With ``shared_prefix`` (and a model that
    supports it) a group is one row holding its common prefix once; otherwise every sequence is its
    own right-padded row. Both give the same rewards up to float rounding.
    """
    if shared_prefix and supports_shared_prefix(model):
        rows = pack_shared_prefix(groups, pad_token_id).to(device)
        return score_shared_prefix(model, rows).float(), rows.tokens  # fp32 even under bf16 autocast
    batch = {k: v.to(device) for k, v in pad_batch([s for g in groups for s in g], pad_token_id).items()}
    return score_sequences(model, batch).float(), int(batch["attention_mask"].sum())


def pair_rewards(
    model: PreTrainedModel,
    groups: list[PromptPairs],
    pad_token_id: int,
    device: torch.device,
    shared_prefix: bool,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(r_chosen, r_rejected, processed tokens) for every pair of ``groups``, in group order."""
    rewards, processed = score_groups(
        model, [g.chosen + g.rejected for g in groups], pad_token_id, device, shared_prefix
    )
    chosen_idx, rejected_idx, start = [], [], 0
    for g in groups:
        k = len(g.chosen)
        chosen_idx += range(start, start + k)
        rejected_idx += range(start + k, start + 2 * k)
        start += 2 * k
    return rewards[chosen_idx], rewards[rejected_idx], processed


@torch.no_grad()
def score_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    batch_size: int = 64,
    shared_prefix: bool = True,
) -> list[float]:
    """r(x, y) per (prompt, completion), returned in input order.

    Completions of the same prompt are scored together (one shared-prefix row per prompt when the
    model supports it); prompt groups are batched in length order, about ``batch_size`` sequences per
    forward pass. The model scores in eval mode and is handed back in the mode it came in.
    """
    device = next(model.parameters()).device
    by_prompt: dict[str, list[int]] = {}
    for i, (prompt, _) in enumerate(pairs):  # a prompt may be text or a conversation
        by_prompt.setdefault(prompt_key(prompt), []).append(i)
    encoded = [encode_completion(tokenizer, prompt, completion) for prompt, completion in pairs]
    groups = sorted(by_prompt.values(), key=lambda idx: sum(len(encoded[i]) for i in idx))
    scores = [0.0] * len(encoded)
    with eval_mode(model):
        for part in _batches_of_groups(groups, batch_size):
            sequences = [[encoded[i] for i in idx] for idx in part]
            rewards, _ = score_groups(model, sequences, tokenizer.pad_token_id, device, shared_prefix)
            for i, value in zip([i for idx in part for i in idx], rewards.cpu().tolist(), strict=True):
                scores[i] = value
    return scores


def _batches_of_groups(groups: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Consecutive groups, about ``batch_size`` sequences per batch (a larger group is a batch alone)."""
    batches: list[list[list[int]]] = []
    size = 0
    for group in groups:
        if not batches or size + len(group) > batch_size:
            batches.append([])
            size = 0
        batches[-1].append(group)
        size += len(group)
    return batches


@dataclass(frozen=True)
class SavedRewardModel:
    """A saved reward model, loaded once: its kind (from its config), the model and its tokenizer."""

    kind: str  # bradley_terry | outcome | process
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def load_saved_reward_model(directory: str | Path) -> SavedRewardModel:
    """The reward model in ``directory``: a Bradley-Terry model (a sequence classifier, loaded with plain
    ``from_pretrained``, with the pad token the reward was trained with) or an outcome/process reward
    model (a token classifier), as its saved config says."""
    kind = reward_kind(AutoConfig.from_pretrained(directory))
    classifier = (
        AutoModelForSequenceClassification if kind == "bradley_terry" else AutoModelForTokenClassification
    )
    return SavedRewardModel(
        kind, classifier.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    )


def reward_model_scorer(saved: SavedRewardModel, options: dict | None, source: str) -> ModelScorer:
    """A scorer of (prompt, completion) batches with ``saved``; an outcome/process reward model's
    per-token or per-step probabilities are aggregated as the source's ``options`` say
    (:mod:`rlhf_core.rewards.token_aggregation`). Options the model's kind does not take fail naming
    ``source``."""
    checked = check_scoring_options(saved.kind, dict(options or {}), source)
    if saved.kind == "bradley_terry":
        return lambda pairs: score_pairs(saved.model, saved.tokenizer, pairs)
    return token_reward_scorer(saved.model, saved.tokenizer, saved.kind, checked)


def load_reward_model_scorer(
    directory: str | Path, options: dict | None = None, source: str = "reward model"
) -> ModelScorer:
    """A scorer of (prompt, completion) batches with the reward model saved in ``directory``."""
    return reward_model_scorer(load_saved_reward_model(directory), options, source)


def load_reward_model_scorers(
    directories: dict[str, str], options: dict[str, dict] | None = None
) -> dict[str, ModelScorer]:
    """Reward source name -> scorer, for the reward models saved in ``directories``; ``options`` holds
    each source's scoring options by name (:func:`rlhf_core.rewards.composite.model_source_options`).
    A model named by several sources (other aggregations of one PRM) is loaded once."""
    options = options or {}
    loaded = {
        directory: load_saved_reward_model(directory) for directory in dict.fromkeys(directories.values())
    }
    return {
        name: reward_model_scorer(loaded[directory], options.get(name), source=name)
        for name, directory in directories.items()
    }
