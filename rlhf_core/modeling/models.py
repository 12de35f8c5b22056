"""Building, loading and saving causal language models.

Three sources, one code path after loading: a tiny random-init Llama built from a config (offline
quickstart and tests), a local directory written by ``save_pretrained``, or a Hugging Face hub name.
Saved models are safetensors + tokenizer + chat template, loadable with plain ``from_pretrained``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_core.data.synthetic import arithmetic_corpus
from rlhf_core.modeling.tokenizer import ensure_chat_template, train_bpe_tokenizer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)

# Words of the chat template and of generic replies, so role markers are not split byte by byte.
_TEMPLATE_WORDS = ["user\n", "assistant\n", "system\n", "You are a helpful assistant."]


class TinyModelShape(Protocol):
    """What :func:`build_tiny_model` reads of its config (the spec's ``TinyModelSource`` is one)."""

    @property
    def hidden_size(self) -> int: ...
    @property
    def intermediate_size(self) -> int | None: ...  # None: 4 * hidden_size
    @property
    def layers(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...  # of the BPE tokenizer trained on the synthetic corpus
    @property
    def max_position_embeddings(self) -> int: ...


def build_tiny_model(
    cfg: TinyModelShape, seed: int, extra_corpus: list[str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A random-init Llama-style decoder and a BPE tokenizer trained on the synthetic corpus (and
    ``extra_corpus``: e.g. tool-use text, so tool calls tokenize compactly)."""
    corpus = arithmetic_corpus(n=4000, seed=seed) + _TEMPLATE_WORDS * 50 + list(extra_corpus or [])
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    _sync_generation_config(model, tokenizer)
    return model, tokenizer


def load_tokenizer(source: str, *, revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a local directory or hub model, with a chat template, EOS and pad token."""
    return ensure_chat_template(AutoTokenizer.from_pretrained(source, revision=revision))


def load_model(
    source: str, *, revision: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory or a hub name.

    Offline (``HF_HUB_OFFLINE=1``) a hub name that is not in the local cache fails fast with the
    library's own error, which names the model.
    """
    tokenizer = load_tokenizer(source, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    _sync_generation_config(model, tokenizer)
    return model, tokenizer


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> Path:
    """Save weights (safetensors), config, generation config and tokenizer atomically into ``directory``."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def _sync_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Generation stops at the tokenizer's EOS (the chat template's end-of-turn) and pads with its pad."""
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
