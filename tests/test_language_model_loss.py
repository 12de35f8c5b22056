"""The chunked next-token loss equals the plain full-logits cross-entropy, values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rlhf_core.losses.language_model import IGNORE_INDEX, next_token_nll_sum, supports_chunked_loss
from rlhf_core.modeling.models import build_tiny_model
from rlhf_core.spec import TinyModelSource

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    model, _ = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), seed=0)
    return model.double()  # float64: differences are then rounding of the chunked sum order only


def _batch(vocab: int):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (3, 20), generator=generator)
    labels = input_ids.clone()
    labels[:, :6] = IGNORE_INDEX  # a prompt
    labels[2, 15:] = IGNORE_INDEX  # padding
    mask = torch.ones_like(input_ids)
    mask[2, 15:] = 0
    return input_ids, labels, mask


def _plain(model, input_ids, labels, mask):
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@pytest.mark.parametrize("chunk_tokens", [7, 2048])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(model, chunk_tokens):
    assert supports_chunked_loss(model)
    input_ids, labels, mask = _batch(model.config.vocab_size)
    chunked = next_token_nll_sum(model, input_ids, labels, attention_mask=mask, chunk_tokens=chunk_tokens)
    plain = _plain(model, input_ids, labels, mask)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-12)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(chunked, params), torch.autograd.grad(plain, params), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_other_heads_use_the_plain_path_and_no_trained_token_still_backpropagates(model):
    other = copy.deepcopy(model)
    other.config.model_type = "gemma2"  # its head soft-caps logits: not a plain linear map
    assert not supports_chunked_loss(other)
    input_ids, labels, mask = _batch(model.config.vocab_size)
    assert next_token_nll_sum(other, input_ids, labels, attention_mask=mask).item() == pytest.approx(
        _plain(model, input_ids, labels, mask).item(), rel=1e-12
    )
    nothing = torch.full_like(labels, IGNORE_INDEX)
    loss = next_token_nll_sum(model, input_ids, nothing, attention_mask=mask)
    loss.backward()  # a zero that is part of the graph
    assert loss.item() == 0.0


@pytest.mark.parametrize("chunk_tokens", [None, 4])
def test_sequence_logprobs_sum_each_rows_completion_tokens_only(model, chunk_tokens):
    """Per-row sums of log pi(label) over labelled positions, equal to a full log-softmax reference;
    the padding of row 2 holds garbage ids, which must not count."""
    from rlhf_core.losses.language_model import sequence_logprobs

    input_ids, labels, mask = _batch(model.config.vocab_size)
    input_ids[2, 15:] = torch.randint(0, model.config.vocab_size, (5,))  # garbage under the padding
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    full = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V): the reference only
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    token = full.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * keep
    sums, counts = sequence_logprobs(model, input_ids, labels, attention_mask=mask, chunk_tokens=chunk_tokens)
    assert counts.tolist() == [14, 14, 9]
    torch.testing.assert_close(sums, token.sum(-1), rtol=0, atol=1e-10)
    grad = torch.autograd.grad(sums.sum(), model.get_output_embeddings().weight)[0]
    expected = torch.autograd.grad(token.sum(), model.get_output_embeddings().weight)[0]
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-10)


def test_sequence_logprobs_plain_head_path_agrees(model):
    """Architectures without a plain head take the logits path: same sums."""
    from rlhf_core.losses import language_model as lm

    input_ids, labels, mask = _batch(model.config.vocab_size)
    chunked, _ = lm.sequence_logprobs(model, input_ids, labels, attention_mask=mask)
    original = lm.PLAIN_LM_HEAD_MODEL_TYPES
    try:
        lm.PLAIN_LM_HEAD_MODEL_TYPES = frozenset()
        assert not lm.supports_chunked_loss(model)
        plain, _ = lm.sequence_logprobs(model, input_ids, labels, attention_mask=mask)
    finally:
        lm.PLAIN_LM_HEAD_MODEL_TYPES = original
    torch.testing.assert_close(plain, chunked, rtol=0, atol=1e-10)
