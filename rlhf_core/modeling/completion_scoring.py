"""Per-token log-probs (and values) of sampled completions, for on-policy RL.

On-policy RL needs, for every token a_t of every sampled completion, log pi(a_t | x, a_<t) under the
policy being trained, the policy that sampled it and the reference, and (PPO) the value V(s_t) of the
state before it. This module lays a batch of (prompt, completion) token sequences out for one forward
pass and reads those numbers at the right places:

- ``shared_prefix`` rows (default, where the model supports them): the G completions of a prompt follow
  the prompt once in one row (:mod:`rlhf_core.modeling.shared_prefix`), so a group's prompt is computed
  once instead of G times;
- padded rows otherwise: one right-padded row per sequence.

Either way :class:`CompletionTokenIndex` says where each completion token's predicting hidden state
sits; the LM head runs on those positions only, in checkpointed chunks (never a (B, T, V) tensor), and
a value model's head reads the same positions. Results are flat over tokens; :func:`to_grid` makes the
(B, T) tensors the losses take.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from rlhf_core.losses.language_model import (
    CHUNK_LOGITS,
    head_token_logprobs,
    supports_chunked_loss,
)
from rlhf_core.modeling.shared_prefix import (
    CompletionTokenIndex,
    attention_mask_for,
    completion_token_index,
    pack_shared_prefix,
    supports_shared_prefix,
    supports_shared_prefix_logprobs,
)


@dataclass
class PackedCompletions:
    """A batch of (prompt, completion) sequences laid out for one forward pass."""

    input_ids: torch.Tensor  # (R, L)
    attention_mask: torch.Tensor  # (R, L) long for padded rows, (R, 1, L, L) bool for shared-prefix rows
    position_ids: torch.Tensor | None  # (R, L) for shared-prefix rows
    index: CompletionTokenIndex  # where every completion token is, in input order
    count: int  # sequences
    width: int  # longest completion
    tokens: int  # tokens processed (non-padding)

    @property
    def shared(self) -> bool:
        return self.position_ids is not None

    def to(self, device: torch.device) -> PackedCompletions:
        index = CompletionTokenIndex(*(getattr(self.index, f).to(device) for f in _INDEX_FIELDS))
        positions = None if self.position_ids is None else self.position_ids.to(device)
        return PackedCompletions(
            self.input_ids.to(device), self.attention_mask.to(device), positions, index, self.count,
            self.width, self.tokens,
        )  # fmt: skip


_INDEX_FIELDS = ("rows", "predictor_cols", "targets", "owner", "position")


def can_share_prefix(*models: PreTrainedModel | None) -> bool:
    """True when every given model (policies, value models) takes shared-prefix rows."""
    for model in models:
        if model is None:
            continue
        has_lm_head = model.get_output_embeddings() is not None and hasattr(model, "get_decoder")
        ok = supports_shared_prefix_logprobs(model) if has_lm_head else supports_shared_prefix(model)
        if not ok:
            return False
    return True


def pack_completions(
    prompts: list[list[int]],
    completions: list[list[int]],
    groups: list[int],
    pad_token_id: int,
    shared_prefix: bool,
) -> PackedCompletions:
    """Lay out sequence i = prompts[i] + completions[i]; ``groups[i]`` names its prompt (completions of
    one prompt share a row when ``shared_prefix``)."""
    if any(not p for p in prompts) or any(not c for c in completions):
        raise ValueError("every sequence needs a non-empty prompt and a non-empty completion")
    width = max(len(c) for c in completions)
    if shared_prefix:
        order = sorted(range(len(prompts)), key=lambda i: groups[i])  # stable: a group's sequences together
        grouped: list[list[int]] = []
        for k, i in enumerate(order):
            if k == 0 or groups[i] != groups[order[k - 1]]:
                grouped.append([])
            grouped[-1].append(i)
        rows = pack_shared_prefix([[prompts[i] + completions[i] for i in g] for g in grouped], pad_token_id)
        index = completion_token_index(rows, [len(prompts[i]) for g in grouped for i in g])
        index.owner = torch.tensor(order, dtype=torch.long)[index.owner]  # back to input order
        return PackedCompletions(
            rows.input_ids, rows.attention_mask, rows.position_ids, index, len(prompts), width, rows.tokens
        )
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    ids = torch.full((len(prompts), max(lengths)), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows_, cols, owner, position = [], [], [], []
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, : lengths[i]] = torch.tensor(p + c)
        mask[i, : lengths[i]] = 1
        rows_ += [i] * len(c)
        cols += range(len(p) - 1, len(p) + len(c) - 1)
        owner += [i] * len(c)
        position += range(len(c))
    row_index, col_index = torch.tensor(rows_), torch.tensor(cols)
    index = CompletionTokenIndex(
        row_index, col_index, ids[row_index, col_index + 1], torch.tensor(owner), torch.tensor(position)
    )
    return PackedCompletions(ids, mask, None, index, len(prompts), width, sum(lengths))


def _hidden(backbone: torch.nn.Module, model: PreTrainedModel, packed: PackedCompletions) -> torch.Tensor:
    if packed.shared:
        dtype = next(model.parameters()).dtype
        return backbone(
            input_ids=packed.input_ids,
            attention_mask=attention_mask_for(model, packed.attention_mask, dtype),
            position_ids=packed.position_ids,
            use_cache=False,
        ).last_hidden_state
    return backbone(
        input_ids=packed.input_ids, attention_mask=packed.attention_mask, use_cache=False
    ).last_hidden_state


def policy_token_logprobs(
    model: PreTrainedModel, packed: PackedCompletions, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) log pi(a_t | x, a_<t) of every completion token (flat, in ``packed.index`` order) and,
    with ``with_entropy``, the (N,) entropy of pi at those positions (no gradient)."""
    index = packed.index
    if supports_chunked_loss(model):
        hidden = _hidden(model.get_decoder(), model, packed)
        selected = hidden[index.rows, index.predictor_cols]  # (N, H)
        logps = head_token_logprobs(model, hidden, selected, index.targets, None)
        if not with_entropy:
            return logps, None
        weight = model.get_output_embeddings().weight
        step = max(1, CHUNK_LOGITS // weight.shape[0])
        with torch.no_grad():
            entropy = torch.cat(
                [hidden.new_zeros(0, dtype=torch.float32)]
                + [_entropy(selected[c : c + step] @ weight.T) for c in range(0, selected.shape[0], step)]
            )
        return logps, entropy
    if packed.shared:
        raise ValueError("shared-prefix rows need a model with a plain LM head (see can_share_prefix)")
    logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask, use_cache=False).logits
    selected = logits[index.rows, index.predictor_cols].float()  # (N, V)
    log_norm = torch.logsumexp(selected, dim=-1)
    logps = selected.gather(-1, index.targets[:, None]).squeeze(-1) - log_norm
    if not with_entropy:
        return logps, None
    with torch.no_grad():
        return logps, _entropy(selected)


def value_token_values(model: PreTrainedModel, packed: PackedCompletions) -> torch.Tensor:
    """(N,) V(s_t) of a value model (a one-output sequence classifier) at every completion token's
    predicting position: the state before the token is generated."""
    hidden = _hidden(model.base_model, model, packed)
    return model.score(hidden[packed.index.rows, packed.index.predictor_cols]).squeeze(-1).float()


def to_grid(flat: torch.Tensor, packed: PackedCompletions) -> torch.Tensor:
    """(N_tokens,) -> (B, T) with T the longest completion; 0 where a completion has ended."""
    grid = flat.new_zeros(packed.count, packed.width)
    return grid.index_put((packed.index.owner, packed.index.position), flat)


def completion_mask(lengths: list[int], width: int, device: torch.device | None = None) -> torch.Tensor:
    """(B, T) True on the first ``lengths[i]`` tokens of row i."""
    return torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
