"""Batched, KV-cached generation from chat prompts.

Two engines produce the same kind of output (``Generations``, prompt-major: the samples of prompt i
sit at ``i * n .. i * n + n - 1``):

- ``native`` (default): our decoding loop over the model's forward pass.
    * each prompt is pre-filled once and its KV cache copied to its ``n`` samples (``generate`` with
      ``num_return_sequences`` pre-fills every copy);
    * prompts are batched in token-length order, so left padding stays short;
    * finished rows leave the batch (the cache is compacted once a quarter of the rows are done)
      instead of decoding until the batch's longest completion ends;
    * the pre-fill computes logits for the last position only.
  It needs a decoder-only model whose forward takes ``position_ids`` and a ``DynamicCache``, which is
  every causal LM in transformers 5. It samples the model's own distribution: processors that a
  model's ``generation_config`` may ask for (repetition penalty, min-p, ...) are not applied, and a
  warning names them.
- ``transformers``: ``model.generate`` on each batch (the reference, and the fallback for models the
  native loop does not cover).

Sampling: softmax(logits / T), optionally restricted to the smallest set of tokens whose mass reaches
``top_p`` (nucleus sampling); ``T == 0`` is greedy. Each batch draws from its own generator, seeded
from ``seed``, so the same call returns the same completions.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.data.schemas import prompt_messages
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.rollout.engines.base import RolloutEngine, SamplingRequest

logger = logging.getLogger(__name__)
Engine = Literal["native", "transformers", "vllm"]
COMPACT_FRACTION = 0.25  # drop finished rows from the batch once this share of it is done


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict]) -> str:
    """The prompt (text as one user turn, or a conversation) followed by the assistant generation header."""
    return tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=False, add_generation_prompt=True)


@dataclass
class Generations:
    texts: list[str]
    new_tokens: list[int]  # generated tokens per completion, up to and including EOS


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    samples_per_prompt: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    engine: Engine | RolloutEngine = "native",
    top_k: int = 0,
) -> Generations:
    """``samples_per_prompt`` completions of each prompt (rendered with the chat template), prompt-major.

    ``batch_size`` counts sequences being decoded together (prompts x samples). Generation stops at
    the tokenizer's EOS or after ``max_new_tokens``. The model decodes in eval mode and is handed back
    in the mode it came in. ``engine`` names an in-process loop, or is an open rollout engine (vLLM:
    :mod:`rlhf_core.rollout.engines`), which decodes with the weights it was last given.
    """
    if not isinstance(engine, str):
        request = SamplingRequest(max_new_tokens, temperature, top_p, top_k, tokenizer.eos_token_id)
        return generate_with_engine(engine, tokenizer, prompts, samples_per_prompt, request, seed)
    with eval_mode(model):
        return _generate(
            model, tokenizer, prompts, max_new_tokens, samples_per_prompt, temperature, top_p, top_k,
            batch_size, seed, engine,
        )  # fmt: skip


def generate_with_engine(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list,
    n: int,
    request: SamplingRequest,
    seed: int,
) -> Generations:
    """``generate`` through a rollout engine: the same prompts (chat template), texts and lengths."""
    encoded = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    out = engine.generate(encoded, n, request, seed)
    texts = tokenizer.batch_decode(out.token_ids, skip_special_tokens=True)
    return Generations([t.strip() for t in texts], [len(c) for c in out.token_ids])


def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    n: int,
    temperature: float,
    top_p: float,
    top_k: int,
    batch_size: int,
    seed: int,
    engine: Engine,
) -> Generations:
    """``generate``'s work, with the model already in eval mode."""
    if engine == "transformers":
        return _generate_with_transformers(
            model, tokenizer, [p for p in prompts for _ in range(n)], max_new_tokens, temperature, top_p,
            top_k, batch_size, seed,
        )  # fmt: skip
    if engine != "native":
        raise ValueError(
            f"engine {engine!r} decodes out of process: open it first (rlhf_core.rollout.engines)"
        )
    _warn_about_ignored_generation_config(model)
    device = next(model.parameters()).device
    encoded = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    per_batch = max(1, batch_size // n)
    seeds = torch.Generator().manual_seed(seed)
    completions: list[list[int]] = [[] for _ in range(len(prompts) * n)]
    for start in range(0, len(order), per_batch):
        batch = order[start : start + per_batch]
        generator = torch.Generator(device=device).manual_seed(
            int(torch.randint(0, 2**31 - 1, (1,), generator=seeds))
        )
        rows = decode_batch(
            model, [encoded[i] for i in batch], n, max_new_tokens, temperature, top_p,
            tokenizer.eos_token_id, tokenizer.pad_token_id, generator, top_k,
        )  # fmt: skip
        for k, i in enumerate(batch):
            completions[i * n : (i + 1) * n] = rows[k * n : (k + 1) * n]
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Generations([t.strip() for t in texts], [len(c) for c in completions])


def decode_batch(
    model: PreTrainedModel,
    prompts: list[list[int]],
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator,
    top_k: int = 0,
) -> list[list[int]]:
    """New token ids (up to and including EOS) for ``n`` samples of each tokenized prompt, prompt-major."""
    device = next(model.parameters()).device
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
        **{cache_arg: cache},
    ).logits[:, -1]  # (P, V)  # fmt: skip
    if n > 1:  # the pre-filled prompt is shared by its samples
        cache.batch_repeat_interleave(n)
        logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        positions = positions.repeat_interleave(n, 0)
    next_position = positions[:, -1] + 1  # (A,)
    row_of = list(range(len(prompts) * n))  # active batch index -> output row
    finished = torch.zeros(len(row_of), dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in row_of]
    for step in range(max_new_tokens):
        tokens = pick_tokens(logits, temperature, top_p, generator, top_k)  # (A,)
        for a, (token, done) in enumerate(zip(tokens.tolist(), finished.tolist(), strict=True)):
            if not done:
                out[row_of[a]].append(token)
        finished |= tokens == eos_token_id
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if int(finished.sum()) >= max(1, COMPACT_FRACTION * len(row_of)):
            keep = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            tokens, mask, next_position = tokens[keep], mask[keep], next_position[keep]
            row_of = [row_of[a] for a in keep.tolist()]
            finished = finished[keep]
        mask = torch.cat([mask, mask.new_ones((len(row_of), 1))], dim=1)
        logits = model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position[:, None],
            use_cache=True, **{cache_arg: cache},
        ).logits[:, -1]  # fmt: skip
        next_position = next_position + 1
    return out


def pick_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator, top_k: int = 0
) -> torch.Tensor:
    """(A,) next tokens from (A, V) logits: greedy at T = 0; else sampled from softmax(logits / T)
    restricted to the ``top_k`` likeliest tokens (0: all), then to the smallest set whose mass reaches
    ``top_p`` (renormalized after the top-k cut, the order vLLM applies them in)."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]  # (A, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before this token already >= p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _generate_with_transformers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    batch_size: int,
    seed: int,
) -> Generations:
    """``model.generate`` per batch of (already repeated) prompts, left-padded."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    seeds = torch.Generator().manual_seed(seed)
    result = Generations([], [])
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [chat_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sampling = {"do_sample": False}
            if temperature > 0:
                sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=seeds)))
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )  # (B, prompt_len + new)
            new = out[:, enc["input_ids"].shape[1] :]  # (B, new)
            result.texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
            result.new_tokens += _lengths_up_to_eos(new, tokenizer.eos_token_id)
    finally:
        tokenizer.padding_side = side
    return result


def generate_completions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], **kwargs
) -> list[str]:
    """Completion texts only; see ``generate``."""
    return generate(model, tokenizer, prompts, **kwargs).texts


def _lengths_up_to_eos(new: torch.Tensor, eos_id: int) -> list[int]:
    """Generated length of each row: up to and including the first EOS, else the whole row."""
    lengths = []
    for row in new.tolist():
        lengths.append(row.index(eos_id) + 1 if eos_id in row else len(row))
    return lengths


# generation_config fields that change the next-token distribution and that the native loop does not apply
_PROCESSOR_DEFAULTS = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "bad_words_ids": None,
    "encoder_repetition_penalty": 1.0,
}


def _warn_about_ignored_generation_config(model: PreTrainedModel) -> None:
    """The native loop samples the model's own distribution (what RL log-probabilities assume); say so
    when the model's generation_config asks for processors that ``model.generate`` would apply."""
    config = getattr(model, "generation_config", None)
    ignored = {
        name: getattr(config, name, default)
        for name, default in _PROCESSOR_DEFAULTS.items()
        if getattr(config, name, default) not in (default, None, [], ())
    }
    if ignored:
        logger.warning(
            "engine native ignores these settings of the model's generation_config: %s "
            "(it samples the model's own distribution; use engine: transformers to apply them)",
            ", ".join(f"{k}={v}" for k, v in ignored.items()),
        )
