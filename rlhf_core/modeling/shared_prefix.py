"""Run several completions of one prompt through a model in a single row that holds the prompt once.

A reward model scores every completion of a prompt at its last token. Run naively, a pair
(chosen, rejected) is two rows that both carry the whole prompt, and InstructGPT's K completions per
prompt become 2 * C(K, 2) rows although only K sequences are distinct (the book, ch.5, notes that
K-wise comparisons need only K forward passes per prompt). Here each prompt group becomes one row:

    [ shared prefix | suffix 1 | suffix 2 | ... | suffix k ]

- the prefix is the longest common token prefix of the group's distinct sequences (the prompt plus
  any shared opening of the answers), stored once;
- suffix j attends to the whole prefix and causally to itself, never to another suffix, and its
  ``position_ids`` continue from the prefix end, so each suffix sees exactly the context it would
  see alone;
- padding tokens attend only to themselves (an all-masked query row would give NaN that leaks into
  the backward pass).

The result is the same function as scoring every sequence in its own row (tested to float rounding),
with fewer tokens to process. It needs a custom 4D attention mask, which transformers' ``sdpa`` and
``eager`` attention accept as-is; other attention kernels (e.g. flash-attention), sliding-window
models and architectures not listed in ``SHARED_PREFIX_MODEL_TYPES`` fall back to padded rows
(:func:`supports_shared_prefix`). A group longer than ``MAX_ROW_TOKENS`` is split over several rows.

Direct alignment uses the same rows for a causal LM: the chosen and the rejected completion of a pair
(or KTO's completion and its mismatched one) follow their prompt once, and ``token_columns`` tells
where each sequence's tokens sit so that every completion token's log-prob is read from the hidden
state that predicts it (``rlhf_core.modeling.completion_scoring``, used by DPO and on-policy RL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from rlhf_core.losses.language_model import supports_chunked_loss

MASKABLE_ATTENTION = ("sdpa", "eager")
MAX_ROW_TOKENS = 4096  # a longer group is split over several rows (each repeating the prefix)
# sequence classifiers that take a custom 4D mask as given, read position_ids for their positions
# (rotary), and pool at one token: the architectures whose shared-prefix scores are tested equal
SHARED_PREFIX_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "smollm3"})


@dataclass
class SharedPrefixRows:
    """Packed rows for a list of sequence groups.

    Attributes:
        input_ids: (R, L) token ids, one row per group, right-padded.
        position_ids: (R, L) positions; each suffix restarts at the prefix length.
        attention_mask: (R, 1, L, L) bool, True where a query token may attend to a key token.
        score_rows, score_cols: (S,) where the last token of each input sequence sits, in input order
            (group by group, sequence by sequence; duplicates point at the same place).
        token_columns: for each input sequence, the column of each of its tokens in row
            ``score_rows[i]`` (the prefix's columns, then its suffix's): what a causal LM needs to
            take every token's log-prob from the hidden state that predicts it.
        tokens: non-padding tokens in the rows (what the model actually processes).
        sequence_tokens: total length of the input sequences (what padded rows would process).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    score_rows: torch.Tensor
    score_cols: torch.Tensor
    token_columns: list[list[int]]
    tokens: int
    sequence_tokens: int

    def to(self, device: torch.device) -> SharedPrefixRows:
        return SharedPrefixRows(
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            score_rows=self.score_rows.to(device),
            score_cols=self.score_cols.to(device),
            token_columns=self.token_columns,
            tokens=self.tokens,
            sequence_tokens=self.sequence_tokens,
        )


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix, capped so every sequence keeps at least one own token."""
    limit = min(len(s) for s in sequences) - 1
    n = 0
    for column in zip(*sequences, strict=False):
        if n >= limit or any(token != column[0] for token in column[1:]):
            break
        n += 1
    return max(n, 0)


@dataclass
class _Row:
    ids: list[int]
    positions: list[int]
    segment: list[int]  # -1 prefix, j >= 0 the j-th suffix of the row


def _group_rows(
    group: list[list[int]], max_row_tokens: int
) -> tuple[list[_Row], list[tuple[int, list[int]]]]:
    """Rows for one group, and (row index, columns of its tokens) of each input sequence.

    Identical sequences are scored once. When prefix + suffixes would exceed ``max_row_tokens``, the
    suffixes are spread over several rows, each repeating the prefix (a row always holds at least one
    suffix), so one prompt with many long completions cannot build an unbounded attention matrix.
    """
    distinct: list[list[int]] = []
    index_of: dict[tuple[int, ...], int] = {}
    which = []
    for seq in group:
        key = tuple(seq)
        if key not in index_of:
            index_of[key] = len(distinct)
            distinct.append(seq)
        which.append(index_of[key])
    p = common_prefix_length(distinct) if len(distinct) > 1 else len(distinct[0]) - 1
    rows: list[_Row] = []
    placed: list[tuple[int, list[int]]] = []  # per distinct sequence
    for seq in distinct:
        suffix = seq[p:]
        if not rows or (len(rows[-1].ids) + len(suffix) > max_row_tokens and len(rows[-1].ids) > p):
            rows.append(_Row(list(seq[:p]), list(range(p)), [-1] * p))
        row = rows[-1]
        j = max(row.segment, default=-1) + 1
        start = len(row.ids)
        row.ids += suffix
        row.positions += range(p, p + len(suffix))
        row.segment += [j] * len(suffix)
        placed.append((len(rows) - 1, list(range(p)) + list(range(start, start + len(suffix)))))
    return rows, [placed[w] for w in which]


def pack_shared_prefix(
    groups: list[list[list[int]]], pad_token_id: int, max_row_tokens: int = MAX_ROW_TOKENS
) -> SharedPrefixRows:
    """Rows for groups of token sequences (each group: the completions of one prompt); one row per
    group unless a group needs more than ``max_row_tokens``."""
    if not groups or any(not g or any(not s for s in g) for g in groups):
        raise ValueError("pack_shared_prefix needs non-empty groups of non-empty sequences")
    all_rows: list[_Row] = []
    rows, columns = [], []
    for group in groups:
        group_rows, placed = _group_rows(group, max_row_tokens)
        rows += [len(all_rows) + r for r, _ in placed]
        columns += [c for _, c in placed]
        all_rows += group_rows
    width = max(len(r.ids) for r in all_rows)
    ids_rows, position_rows, segment_rows = [], [], []
    for row in all_rows:
        pad = width - len(row.ids)
        ids_rows.append(row.ids + [pad_token_id] * pad)
        position_rows.append(row.positions + [0] * pad)
        segment_rows.append(row.segment + [-2] * pad)  # -2 marks padding
    input_ids = torch.tensor(ids_rows, dtype=torch.long)
    position_ids = torch.tensor(position_rows, dtype=torch.long)
    segment = torch.tensor(segment_rows, dtype=torch.long)
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]  # (R, L, 1), (R, 1, L)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    same_or_prefix = ((k_seg == -1) & (q_seg != -2)) | ((k_seg == q_seg) & (q_seg >= 0))
    padding_self = (q_seg == -2) & torch.eye(width, dtype=torch.bool)
    mask = (causal & same_or_prefix) | padding_self
    return SharedPrefixRows(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=mask[:, None],
        score_rows=torch.tensor(rows, dtype=torch.long),
        score_cols=torch.tensor([c[-1] for c in columns], dtype=torch.long),
        token_columns=columns,
        tokens=int((segment != -2).sum()),
        sequence_tokens=sum(len(s) for g in groups for s in g),
    )


@dataclass
class CompletionTokenIndex:
    """Where the completion tokens of packed sequences sit, flattened over all of them (N tokens).

    Attributes:
        rows, predictor_cols: (N,) the row and column of the hidden state that predicts each token (the
            column of the token before it, which for a suffix's first token is the prefix's last).
        targets: (N,) the token ids.
        owner: (N,) the input sequence each token belongs to.
        position: (N,) the token's index within its completion (0 for the first completion token).
    """

    rows: torch.Tensor
    predictor_cols: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    position: torch.Tensor


def completion_token_index(rows: SharedPrefixRows, completion_starts: list[int]) -> CompletionTokenIndex:
    """The completion tokens of each input sequence of ``rows``: its tokens from ``completion_starts[i]``
    on (the prompt's length), each paired with the hidden state that predicts it."""
    where_rows, where_cols, target_cols, owner, position = [], [], [], [], []
    for i, (row, columns) in enumerate(zip(rows.score_rows.tolist(), rows.token_columns, strict=True)):
        start = completion_starts[i]
        if start < 1:
            raise ValueError("a completion needs at least one token before it (its prompt) to be scored")
        n = len(columns) - start
        where_rows += [row] * n
        where_cols += columns[start - 1 : -1]
        target_cols += columns[start:]
        owner += [i] * n
        position += range(n)
    device = rows.input_ids.device

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    row_index = tensor(where_rows)
    return CompletionTokenIndex(
        rows=row_index,
        predictor_cols=tensor(where_cols),
        targets=rows.input_ids[row_index, tensor(target_cols)],
        owner=tensor(owner),
        position=tensor(position),
    )


def attention_takes_shared_prefix(model: PreTrainedModel) -> bool:
    """True for a listed architecture with full attention in every layer (a custom mask replaces a
    sliding window, which would silently widen it) and an attention kernel that takes the mask."""
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    sliding = getattr(config, "sliding_window", None) is not None and getattr(
        config, "use_sliding_window", True
    )
    return (
        getattr(config, "model_type", None) in SHARED_PREFIX_MODEL_TYPES
        and getattr(config, "_attn_implementation", None) in MASKABLE_ATTENTION
        and layer_types == {"full_attention"}
        and not sliding
    )


def supports_shared_prefix(model: PreTrainedModel) -> bool:
    """True for a sequence classifier (a ``score`` head on a backbone) whose attention takes the mask."""
    return (
        attention_takes_shared_prefix(model)
        and isinstance(getattr(model, "score", None), torch.nn.Linear)
        and model.base_model is not model
    )


def supports_shared_prefix_logprobs(model: PreTrainedModel) -> bool:
    """True for a causal LM whose shared-prefix rows give the same log-probs as one row per sequence:
    a plain LM head (:func:`rlhf_core.losses.language_model.supports_chunked_loss`) on an attention that
    takes the shared-prefix mask."""
    return supports_chunked_loss(model) and attention_takes_shared_prefix(model)


def attention_mask_for(model: PreTrainedModel, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if model.config._attn_implementation == "sdpa":
        return mask
    # eager attention adds the mask to the scores: 0 where allowed, the dtype's minimum elsewhere
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def score_shared_prefix(model: PreTrainedModel, rows: SharedPrefixRows) -> torch.Tensor:
    """(S,) rewards of every input sequence, in input order: the score head at each sequence's end."""
    dtype = next(model.parameters()).dtype
    hidden = model.base_model(
        input_ids=rows.input_ids,
        attention_mask=attention_mask_for(model, rows.attention_mask, dtype),
        position_ids=rows.position_ids,
        use_cache=False,
    ).last_hidden_state  # (R, L, H), after the backbone's final norm
    return model.score(hidden[rows.score_rows, rows.score_cols]).squeeze(-1)
