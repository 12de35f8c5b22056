"""Next-token negative log-likelihood without materialising the full (batch, sequence, vocabulary) logits.

SFT trains on assistant tokens only: L = -sum_t m_t log pi(y_t | x, y_<t) (book ch.4), with m_t = 1 on
trained tokens. A causal LM's head maps every position's hidden state to vocabulary logits, so the
plain way builds a (B, T, V) tensor (plus its fp32 copy and gradient): with a 150k vocabulary and
8 x 2048 tokens that is ~10 GB per copy. Here:

1. the backbone runs alone (``model.get_decoder()``) and returns hidden states (B, T, H);
2. only the positions whose next token is trained are kept (prompt and padding positions never reach
   the head);
3. those positions go through the head in chunks of ``CHUNK_LOGITS / V`` tokens; each chunk's logits
   live only inside a checkpointed function, so the backward pass recomputes them chunk by chunk
   instead of keeping them all.

Peak extra memory is about one chunk's logits (and their softmax) instead of all positions'. The result is
the same sum as the plain cross-entropy up to float rounding (tested, with gradients). Models whose
head does more than a linear map (logit soft-capping, logit scaling, ...) use the plain path; the
chunked path is used for the architectures listed in ``PLAIN_LM_HEAD_MODEL_TYPES``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

IGNORE_INDEX = -100
CHUNK_LOGITS = 2**25  # logits per chunk (~128 MiB in fp32): 256 tokens at a 128k vocabulary
# causal LMs whose logits are exactly lm_head(final hidden state)
PLAIN_LM_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "smollm3"})


def supports_chunked_loss(model: PreTrainedModel) -> bool:
    head = model.get_output_embeddings()
    return (
        getattr(model.config, "model_type", None) in PLAIN_LM_HEAD_MODEL_TYPES
        and type(head) is torch.nn.Linear
        and head.bias is None
        and model.get_decoder() is not model
    )


def _chunk_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.T  # (n, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, reduction="sum")


def next_token_nll_sum(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """sum_t -log pi(labels[t] | tokens < t) over positions with ``labels != IGNORE_INDEX``.

    ``labels`` are aligned with ``input_ids`` (the hidden state at t - 1 predicts ``labels[t]``).
    """
    inputs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
    if not supports_chunked_loss(model):
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (B, T-1)
    selected = hidden[:, :-1][keep]  # (N, H)
    targets = targets[keep]  # (N,)
    weight = model.get_output_embeddings().weight  # (V, H)
    chunk_tokens = chunk_tokens or max(1, CHUNK_LOGITS // weight.shape[0])
    # starts as a zero that is part of the graph, so a batch without trained tokens still backpropagates
    total = hidden[:, :0].sum().to(torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, selected.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_nll_sum, selected[part], weight, targets[part], use_reentrant=False)
    return total


def _chunk_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.T  # (n, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return -F.cross_entropy(logits, targets, reduction="none")  # (n,) log pi(target)


def head_token_logprobs(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    selected: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int | None,
) -> torch.Tensor:
    """(N,) log pi(targets) from the (N, H) ``selected`` hidden states through the LM head, in
    checkpointed chunks; ``hidden`` is the whole backbone output the selection came from."""
    weight = model.get_output_embeddings().weight  # (V, H)
    chunk_tokens = chunk_tokens or max(1, CHUNK_LOGITS // weight.shape[0])
    chunks = range(0, selected.shape[0], chunk_tokens)
    # starts as a zero that is part of the graph, so rows without labelled tokens still backpropagate
    return torch.cat(
        [hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0]
        + [checkpoint(_chunk_token_logprobs, selected[c : c + chunk_tokens], weight,
                      targets[c : c + chunk_tokens], use_reentrant=False) for c in chunks]
    )  # fmt: skip


def sequence_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_t log pi(labels[t] | tokens < t), number of such t) per row, over ``labels != IGNORE_INDEX``.

    The log pi(y|x) of a completion y when only its tokens carry labels (book ch.8: DPO's log-probs are
    sums over completion tokens, the prompt masked). Shapes: (B,) float32 and (B,) long. As in
    :func:`next_token_nll_sum`, only labelled positions reach the LM head, in checkpointed chunks, for
    the architectures with a plain head; others compute the logits and take the label's log-softmax
    value by gather and logsumexp, never a full log-softmax tensor.
    """
    inputs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
    if not supports_chunked_loss(model):
        return logits_sequence_logprobs(model(**inputs, use_cache=False).logits, labels)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (B, T-1)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(keep)[keep]  # (N,)
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    token_logp = head_token_logprobs(model, hidden, hidden[:, :-1][keep], targets[keep], chunk_tokens)
    sums = token_logp.new_zeros(labels.shape[0]).index_add(0, rows, token_logp)
    return sums, keep.sum(-1)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    logits = logits.to(dtype)  # (b, T-1, V)
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (b, T-1)


def logits_sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of log pi(y_t | x, y_<t) over completion tokens, and their count.

    ``labels`` are aligned with the input ids, as in ``next_token_nll_sum``: ``logits[:, t - 1]`` scores
    ``labels[:, t]``, and IGNORE_INDEX marks prompt and padding positions (whatever their logits hold).
    Selective log-softmax: log pi(y_t) = z_t[y_t] - logsumexp(z_t), so the (B, T, V) log-softmax is never
    built. Sequences go through in checkpointed chunks of ``chunk_rows``: only one chunk's float32 working
    copy (of bf16 logits) and exponentials exist at a time, in the forward and again in the backward pass.

    Args:
        logits: (B, T, V) logits of the policy (or reference) on prompt + completion.
        labels: (B, T) token ids, IGNORE_INDEX outside the completion.
    Returns:
        sum_logp: (B,) float32 (float64 for float64 logits); n_tokens: (B,) int64.
    """
    batch, length, vocab = logits.shape
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~keep, 0).unsqueeze(-1)  # (B, T-1, 1)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    chunk_rows = chunk_rows or max(1, CHUNK_LOGITS // max(1, length * vocab))
    per_token = []
    for start in range(0, batch, chunk_rows):
        rows = slice(start, start + chunk_rows)
        # checkpointed: the backward pass recomputes the chunk instead of keeping its float32 copy
        chunk = checkpoint(_token_logprobs, logits[rows, :-1], safe_targets[rows], dtype, use_reentrant=False)
        per_token.append(chunk)  # (b, T-1)
    # where, not a multiply by the mask: a garbage position must not leak inf or nan into the sum
    token_logp = torch.where(keep, torch.cat(per_token), 0.0)  # (B, T-1)
    return token_logp.sum(-1), keep.sum(-1)
