"""A reward model (book ch.5): a one-label sequence classifier on a policy's backbone.

Architecture: ``AutoModelForSequenceClassification`` with one label on the policy checkpoint; the
score is read at the last non-padding token, which is the end-of-turn token ``<|im_end|>`` because
every (prompt, completion) is rendered with the chat template and trailing whitespace is stripped
(:mod:`rlhf_core.modeling.preference_tokens`). The score head starts at zero, so every reward is 0 and
the Bradley-Terry loss is exactly ln 2 at initialisation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

REWARD_PAD_TOKEN = "<|reward_pad|>"  # added when a policy tokenizer pads with its EOS


def build_reward_model(
    source: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, revision: str | None = None
) -> PreTrainedModel:
    """A one-label sequence classifier on the backbone at ``source``, with a zero score head.

    With the policy's ``tokenizer``: a tokenizer whose pad token is its EOS (or missing) gets its own
    pad token, added to ``tokenizer`` in place. Transformers' classifier reads the reward at the last
    token that is not padding, so with pad == EOS it would skip the end-of-turn token the reward is
    trained at, and anyone loading the saved model with plain ``from_pretrained`` would get other
    rewards. Then the embeddings grow to the tokenizer's vocabulary (also for a hub model whose
    tokenizer gained chat tokens) and ``pad_token_id`` is set in the config.
    """
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, dtype=torch.float32, revision=revision
    )
    if tokenizer is not None:
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            tokenizer.add_special_tokens({"pad_token": REWARD_PAD_TOKEN})
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    head = model.score if hasattr(model, "score") else model.get_output_embeddings()
    torch.nn.init.zeros_(head.weight)
    if getattr(head, "bias", None) is not None:
        torch.nn.init.zeros_(head.bias)
    return model
