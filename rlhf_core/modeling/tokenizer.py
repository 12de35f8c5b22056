"""Tokenizers and chat templates.

The offline quickstart trains a small byte-level BPE tokenizer locally (``tokenizers`` library), with
digits split one per token so arithmetic is learnable by a tiny model. Every tokenizer we save carries
its chat template and EOS token, so both travel with the model to every later stage.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, IM_START, IM_END, PAD_TOKEN]

# ChatML as in the book (ch.4 §chat templates): bos, strict user/assistant alternation after an
# optional system turn, each message `<|im_start|>role\ncontent<|im_end|>\n`, and `<|im_start|>assistant\n`
# as the generation prompt. The end-of-turn token `<|im_end|>` is the EOS used for generation.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set offset = 1 %}{% else %}{% set offset = 0 %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != ((loop.index0 - offset) % 2 == 0) and not "
    "(loop.index0 == 0 and message['role'] == 'system') %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ChatML special tokens on ``corpus``.

    Deterministic for a given corpus. Digits are split individually before BPE merges.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, mode: str = "keep") -> PreTrainedTokenizerBase:
    """Give the tokenizer a chat template, an EOS and a pad token.

    ``mode='keep'`` keeps an existing template; ``'chatml'`` (or a tokenizer without one) installs ChatML
    and its special tokens, and makes ``<|im_end|>`` the EOS.
    """
    if mode == "chatml" or not tokenizer.chat_template:
        missing = [t for t in (IM_START, IM_END) if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        if tokenizer.bos_token is None:
            tokenizer.bos_token = tokenizer.eos_token or IM_END
        tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.eos_token = IM_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
