"""Tests for rlhf_core.modeling: the tiny model's tokenizer, ChatML, saving/loading and digests."""

from __future__ import annotations

import copy
from pathlib import Path

import jinja2
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from rlhf_core.modeling.digests import model_digest, tokenizer_digest
from rlhf_core.modeling.models import build_tiny_model, load_model, save_model
from rlhf_core.modeling.sft_tokens import IGNORE_INDEX, tokenize_conversation
from rlhf_core.modeling.tokenizer import CHATML_TEMPLATE, IM_END, IM_START, ensure_chat_template
from rlhf_core.spec import TinyModelSource

TINY = TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320)
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 7 + 12?"},
    {"role": "assistant", "content": "7 + 12 = 19. The answer is 19."},
]
# ChatML as documented in rlhf_core/modeling/tokenizer.py: bos, then `<|im_start|>role\ncontent<|im_end|>\n`
# per message.
CONVERSATION_CHATML = (
    "<|endoftext|>"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 7 + 12?<|im_end|>\n"
    "<|im_start|>assistant\n7 + 12 = 19. The answer is 19.<|im_end|>\n"
)
TOKEN_IDS = torch.tensor([[0, 1, 20, 21, 22, 2, 30, 31, 32, 33]])


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(TINY, seed=0)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> Path:
    model, tokenizer = tiny
    return save_model(model, tokenizer, tmp_path_factory.mktemp("saved") / "model")


def _bare_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no special tokens and no chat template (like many base models)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["hello world", "what is the answer"] * 10, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


# --- tokenizer and chat template ------------------------------------------------------------


def test_chat_template_renders_chatml_exactly(tiny) -> None:
    _, tokenizer = tiny
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == CONVERSATION_CHATML
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == CONVERSATION_CHATML.split("7 + 12 = 19")[0]  # ends with "<|im_start|>assistant\n"
    assert prompt.endswith("<|im_start|>assistant\n")


def test_chat_template_rejects_non_alternating_roles(tiny) -> None:
    _, tokenizer = tiny
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        tokenizer.apply_chat_template(two_users, tokenize=False)


def test_eos_is_end_of_turn_and_special_tokens_are_single_ids(tiny) -> None:
    model, tokenizer = tiny
    assert tokenizer.eos_token == IM_END
    for special in ("<|endoftext|>", IM_START, IM_END, "<|pad|>"):
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1, special
    # Generation must stop at the end of an assistant turn.
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(IM_END)
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id


def test_digits_are_single_tokens(tiny) -> None:
    _, tokenizer = tiny
    for digit in "0123456789":
        assert tokenizer.tokenize(digit) == [digit]
    # Even digit strings seen thousands of times in the corpus are never merged.
    assert tokenizer.tokenize("12345") == list("12345")
    assert tokenizer.tokenize("= 19.")[-3:] == ["1", "9", "."]


def test_tiny_model_is_deterministic_per_seed(tiny) -> None:
    model, tokenizer = tiny
    again, tok_again = build_tiny_model(TINY, seed=0)
    assert tok_again.get_vocab() == tokenizer.get_vocab()
    for (name, p), q in zip(model.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q), name
    other, _ = build_tiny_model(TINY, seed=1)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)


# --- saving and loading ---------------------------------------------------------------------


def test_saved_model_loads_with_plain_from_pretrained(tiny, saved) -> None:
    model, tokenizer = tiny
    assert (saved / "model.safetensors").exists() and (saved / "chat_template.jinja").exists()
    loaded = AutoModelForCausalLM.from_pretrained(saved)
    loaded_tok = AutoTokenizer.from_pretrained(saved)
    with torch.no_grad():
        assert torch.equal(loaded(TOKEN_IDS).logits, model(TOKEN_IDS).logits)
    assert loaded_tok.chat_template == tokenizer.chat_template == CHATML_TEMPLATE
    assert loaded_tok.apply_chat_template(CONVERSATION, tokenize=False) == CONVERSATION_CHATML
    assert loaded_tok(CONVERSATION_CHATML)["input_ids"] == tokenizer(CONVERSATION_CHATML)["input_ids"]
    assert loaded_tok.eos_token == IM_END
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id


def test_load_model_from_local_directory(tiny, saved) -> None:
    model, tokenizer = tiny
    loaded, loaded_tok = load_model(str(saved))
    with torch.no_grad():
        assert torch.equal(loaded(TOKEN_IDS).logits, model(TOKEN_IDS).logits)
    assert loaded_tok.chat_template == tokenizer.chat_template
    assert loaded_tok.eos_token_id == tokenizer.eos_token_id
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id
    # Masking must give the same labels with the reloaded tokenizer.
    assert tokenize_conversation(CONVERSATION, loaded_tok, 256) == tokenize_conversation(
        CONVERSATION, tokenizer, 256
    )


def test_load_model_keeps_the_tokenizers_own_template(tiny, tmp_path) -> None:
    model, tokenizer = tiny
    custom = copy.deepcopy(tokenizer)
    custom.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    save_model(model, custom, tmp_path / "custom")
    _, kept = load_model(str(tmp_path / "custom"))
    assert kept.chat_template == custom.chat_template


def test_digests_are_stable_and_track_weights_and_template(tiny, saved, tmp_path) -> None:
    model, tokenizer = tiny
    again = save_model(model, tokenizer, tmp_path / "again")
    assert model_digest(again) == model_digest(saved)
    assert tokenizer_digest(again) == tokenizer_digest(saved)

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.lm_head.weight[0, 0] += 1e-3
    changed_dir = save_model(changed, tokenizer, tmp_path / "changed")
    assert model_digest(changed_dir) != model_digest(saved)
    assert tokenizer_digest(changed_dir) == tokenizer_digest(saved)  # same tokenizer files

    retemplated = copy.deepcopy(tokenizer)
    retemplated.chat_template = CHATML_TEMPLATE.replace("assistant", "bot")
    retemplated_dir = save_model(model, retemplated, tmp_path / "retemplated")
    assert tokenizer_digest(retemplated_dir) != tokenizer_digest(saved)
    assert model_digest(retemplated_dir) != model_digest(saved)


def test_save_model_replaces_an_existing_directory(tiny, tmp_path) -> None:
    model, tokenizer = tiny
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("left over from an older run")
    save_model(model, tokenizer, target)
    assert not (target / "stale.txt").exists()
    assert not (tmp_path / "model.tmp").exists()


# --- ensure_chat_template -------------------------------------------------------------------


def test_ensure_chat_template_installs_chatml_on_a_bare_tokenizer() -> None:
    bare = _bare_tokenizer()
    assert bare.chat_template is None and bare.eos_token is None and IM_END not in bare.get_vocab()
    tok = ensure_chat_template(bare)
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.eos_token == IM_END and tok.pad_token is not None
    # The ChatML markers were added as special tokens: one id each, never split into bytes.
    ids = tok("<|im_start|>user\nhello<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(IM_START) and ids[-1] == tok.convert_tokens_to_ids(IM_END)
    text = tok.apply_chat_template(CONVERSATION[1:], tokenize=False)
    assert text.endswith(
        CONVERSATION_CHATML.removeprefix(
            "<|endoftext|><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        )
    )
    # Masking works with it: the trained tokens are the answer and its <|im_end|>.
    example = tokenize_conversation(CONVERSATION[1:], tok, 256)
    trained = [t for t in example.labels if t != IGNORE_INDEX]
    assert tok.decode(trained) == "7 + 12 = 19. The answer is 19." + IM_END


def test_ensure_chat_template_keeps_or_overrides_an_existing_template(tiny) -> None:
    _, tokenizer = tiny
    custom = copy.deepcopy(tokenizer)
    custom.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert ensure_chat_template(copy.deepcopy(custom), "keep").chat_template == custom.chat_template
    assert ensure_chat_template(copy.deepcopy(custom), "chatml").chat_template == CHATML_TEMPLATE
