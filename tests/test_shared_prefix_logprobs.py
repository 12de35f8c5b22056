"""Direct alignment's shared-prefix rows (prompt once, then the chosen and the rejected completion) give
the completion log-probs, lengths and gradients of one padded row per sequence."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rlhf_core.modeling.preference_tokens import CompletionTokens, PairTokens
from rlhf_core.modeling.shared_prefix import (
    completion_token_index,
    pack_shared_prefix,
    supports_shared_prefix_logprobs,
)
from rlhf_core.training.direct_alignment.reference import example_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB, PAD = 97, 0


def _model(family: str, attention: str):
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    model.set_attn_implementation(attention)
    # float64, but the rotary tables stay float32 inside the model: two attention kernels on the same
    # padded rows (sdpa vs eager) already differ by ~1e-8 in log-probs and ~2e-7 in gradients
    return model.double().eval()


def _tokens(generator, n):
    return torch.randint(1, VOCAB, (n,), generator=generator).tolist()


def _pairs():
    g = torch.Generator().manual_seed(3)
    pairs = []
    for i in range(7):
        prompt = _tokens(g, 3 + 2 * i)
        chosen, rejected = _tokens(g, 2 + i % 4), _tokens(g, 5 - i % 3)
        pairs.append(PairTokens(prompt, chosen, rejected, i))
    pairs.append(PairTokens([5, 6], [7, 8, 9], [7, 8, 10, 11], 7))  # completions share an opening
    pairs.append(PairTokens([5, 6, 1], [4, 4], [4, 4, 4], 8))  # the chosen is a prefix of the rejected
    pairs.append(PairTokens([9], [3], [3], 9))  # identical completions, one-token prompt
    return pairs


@pytest.mark.parametrize(("family", "attention"), [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_pairs_match_one_row_per_sequence_with_gradients(family, attention):
    model = _model(family, attention)
    assert supports_shared_prefix_logprobs(model)
    pairs = _pairs()
    ids = list(range(len(pairs)))
    shared, shared_lengths = example_logprobs(model, pairs, ids, PAD, shared_prefix=True)
    padded, padded_lengths = example_logprobs(model, pairs, ids, PAD, shared_prefix=False)
    assert shared.shape == (2, len(pairs))
    assert shared_lengths.tolist() == padded_lengths.tolist()
    assert shared_lengths[:, -3:].tolist() == [[3, 2, 1], [4, 3, 1]]
    torch.testing.assert_close(shared, padded, rtol=0, atol=1e-7)
    weights = torch.randn(shared.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    params.append(model.model.layers[0].self_attn.q_proj.weight)
    grads = torch.autograd.grad((shared * weights).sum(), params)
    expected = torch.autograd.grad((padded * weights).sum(), params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_kto_completion_and_mismatched_completion_share_the_prompt():
    model = _model("llama", "sdpa")
    g = torch.Generator().manual_seed(5)
    examples = [CompletionTokens(_tokens(g, 4 + i), _tokens(g, 3 + i % 2), i % 2 == 0, i) for i in range(5)]
    ids = [0, 2, 4]
    shared, lengths = example_logprobs(model, examples, ids, PAD, shared_prefix=True)
    padded, _ = example_logprobs(model, examples, ids, PAD, shared_prefix=False)
    torch.testing.assert_close(shared, padded, rtol=0, atol=1e-7)
    assert lengths[1].tolist() == [len(examples[i].completion) for i in (1, 3, 0)]  # y_{i+1}, wrapping


def test_prompt_is_processed_once_per_pair():
    pairs = _pairs()[:7]
    groups = [[p.prompt + p.chosen, p.prompt + p.rejected] for p in pairs]
    rows = pack_shared_prefix(groups, PAD)
    prompt_tokens = sum(len(p.prompt) for p in pairs)
    assert rows.tokens == rows.sequence_tokens - prompt_tokens
    assert rows.token_columns[0] == list(range(len(groups[0][0])))
    second = rows.token_columns[1]  # the rejected: the prompt's columns, then after the chosen
    assert second[: len(pairs[0].prompt)] == list(range(len(pairs[0].prompt)))
    assert second[len(pairs[0].prompt)] == len(groups[0][0])


def test_a_completion_needs_a_prompt_token():
    rows = pack_shared_prefix([[[1, 2], [1, 3]]], PAD)
    with pytest.raises(ValueError, match="at least one token before it"):
        completion_token_index(rows, [0, 1])


def test_other_architectures_use_padded_rows():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert not supports_shared_prefix_logprobs(gpt2)
    pairs = _pairs()[:3]
    logps, lengths = example_logprobs(gpt2, pairs, [0, 1, 2], PAD, shared_prefix=True)
    assert logps.shape == (2, 3) and lengths[0].tolist() == [len(p.chosen) for p in pairs]
    sliding = _model("qwen2", "sdpa")
    sliding.config.use_sliding_window, sliding.config.sliding_window = True, 4
    assert not supports_shared_prefix_logprobs(sliding)  # the mask would silently widen the window
