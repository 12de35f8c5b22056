"""Tokenizers and chat templates.

The offline quickstart trains a small byte-level BPE tokenizer locally (``tokenizers`` library), with
digits split one per token so arithmetic is learnable by a tiny model. Every tokenizer we save carries
its chat template and EOS token, so both travel with the model to every later stage.

The ChatML template also renders tool use (book ch.13, tool use and function calling): the function
declarations passed as ``tools=`` go into the system turn, an assistant's ``tool_calls`` are written as
``<tool_call>`` blocks, and ``tool`` messages (the results) are turns of their own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rlhf_core.errors import UserError

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, IM_START, IM_END, PAD_TOKEN]

# What the system turn says when tools are given (Hermes/Qwen-style: declarations as JSON inside
# <tools></tools>, calls as JSON inside <tool_call></tool_call>). No single quotes: it sits in a Jinja
# string literal.
TOOLS_INTRO = (
    "# Tools\n\n"
    "You can call the functions declared below (JSON Schema, one per line) to help with the task.\n"
    "<tools>"
)
TOOL_CALL_FORMAT = (
    "</tools>\n\n"
    "To call one, write a JSON object with its name and arguments inside tool_call tags:\n"
    '<tool_call>\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>\n'
    "The result comes back in a tool message."
)
_RAISE_ALTERNATION = (
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
)
_RAISE_TOOL_ORDER = (
    "{{ raise_exception('A tool message must follow an assistant message that calls tools, "
    "or another tool message') }}"
)

# ChatML as in the book (ch.4 §chat templates): bos, strict user/assistant alternation after an
# optional system turn, each message `<|im_start|>role\ncontent<|im_end|>\n`, and `<|im_start|>assistant\n`
# as the generation prompt. The end-of-turn token `<|im_end|>` is the EOS used for generation.
# Conversations without tools render exactly as the ChatML template before tool support did (pinned by
# tests/test_tool_template.py).
#
# Tool use (ch.13):
# - ``tools``: a system turn (after the system prompt if any) lists each declaration's JSON;
# - an assistant's ``tool_calls``: its content, then one `<tool_call>\n{"name": ..., "arguments": ...}\n
#   </tool_call>` per call, joined by newlines: exactly the text a model writes, so rendering a parsed call
#   gives back the model's text (arguments given as a string are written as they are);
# - a ``tool`` message: a turn of its own, `<|im_start|>tool\ncontent<|im_end|>\n`. Not Qwen's form (results
#   wrapped in <tool_response> inside a user turn that consecutive results share): there a result's text
#   depends on whether another result follows, so a conversation would not render prefix by prefix, which
#   loss masking and multi-turn rollouts need (sft_tokens.assistant_spans, trajectory_tokens).
# Order check: a user turn may not follow a user turn, an assistant (or any other role) needs a user or
# tool turn before it, and a tool turn needs an assistant or tool turn before it. Without tool messages
# this accepts exactly the conversations the plain template's parity check accepted.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(previous='start', tools='') %}"
    "{% if tools %}"
    "{% set ns.tools = '" + TOOLS_INTRO + "' %}"
    "{% for tool in tools %}{% set ns.tools = ns.tools + '\n' + tool | tojson %}{% endfor %}"
    "{% set ns.tools = ns.tools + '\n" + TOOL_CALL_FORMAT + "' %}"
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n' + ns.tools + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% set role = message['role'] %}"
    "{% if loop.index0 == 0 and role == 'system' %}"
    "{% elif role == 'user' %}"
    "{% if ns.previous == 'user' %}" + _RAISE_ALTERNATION + "{% endif %}"
    "{% set ns.previous = 'user' %}"
    "{% elif role == 'tool' %}"
    "{% if ns.previous not in ('assistant', 'tool') %}" + _RAISE_TOOL_ORDER + "{% endif %}"
    "{% set ns.previous = 'tool' %}"
    "{% else %}"
    "{% if ns.previous not in ('user', 'tool') %}" + _RAISE_ALTERNATION + "{% endif %}"
    "{% set ns.previous = 'assistant' %}"
    "{% endif %}"
    "{% set content = (message['content'] or '') | trim %}"
    "{{ '<|im_start|>' + role + '\n' + content }}"
    "{% if loop.index0 == 0 and role == 'system' and tools %}{{ '\n\n' + ns.tools }}{% endif %}"
    "{% for call in message.tool_calls or [] %}"
    "{% set function = call.function if call.function is defined else call %}"
    "{% if content or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": ' + function.name | tojson + ', \"arguments\": ' }}"
    "{{ function.arguments if function.arguments is string else function.arguments | tojson }}"
    "{{ '}\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\n' }}"
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


PROBE_TOOL_NAME = "probe_tool_support_5e1f0c"  # unlikely to appear in any template's own text


def tool_call_text(name: str, arguments: dict | str) -> str:
    """A call as the ChatML template writes it (and a model trained on it writes it): one ``<tool_call>``
    block holding ``{"name": ..., "arguments": ...}`` (``json.dumps`` with its default separators,
    non-ASCII kept); arguments given as a string are written as they are."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return (
        f'<tool_call>\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}\n</tool_call>'
    )


def supports_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template renders the ``tools`` it is given (many templates ignore them).

    Renders a one-turn conversation with a probe tool and looks for the tool's name in the text.
    """
    probe = {
        "type": "function",
        "function": {
            "name": PROBE_TOOL_NAME,
            "description": "Checks that tools are rendered.",
            "parameters": {"type": "object", "properties": {}},
        },
    }
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hello"}], tools=[probe], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # noqa: BLE001 - a template that cannot render tools does not support them
        return False
    return PROBE_TOOL_NAME in text


def require_tool_support(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Raise :class:`UserError` unless the chat template renders ``tools=`` (``where``: stage and model)."""
    if not supports_tools(tokenizer):
        raise UserError(
            f"{where}: the tokenizer's chat template ignores the tools it is given (tools=), so the model "
            "would never see the functions it may call; use a model whose chat template renders tools "
            "(Qwen2.5/3, Llama 3.1+, Hermes, or a tokenizer saved with this project's ChatML template)"
        )
