"""Completions of a group of prompts and what the models say about each of their tokens, on plain values.

On-policy training (``rlhf_core.training.policy_gradient.rollouts``) and the over-optimization monitor
build their rollouts from these: prompts encoded with the chat template, G sampled completions per prompt
(KV-cached decoding, the policy in eval mode), and per-token log-probs, entropy and values of the
completions, several completions of a prompt sharing one row where the models support it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.modeling.completion_scoring import (
    pack_completions,
    policy_token_logprobs,
    to_grid,
    value_token_values,
)
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.rollout.generation import chat_prompt, decode_batch


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[Any]) -> list[list[int]]:
    """Token ids of each prompt rendered with the chat template and the assistant generation header."""
    return [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


def sample_groups(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    seed: int,
    top_k: int = 0,
) -> list[list[int]]:
    """``group_size`` completions of each prompt (prompt-major), in eval mode, decoded in batches of about
    ``batch_size`` sequences."""
    g = group_size
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    per_batch = max(1, batch_size // g)
    out: list[list[int]] = []
    with eval_mode(policy), torch.no_grad():
        for start in range(0, len(prompt_ids), per_batch):
            out += decode_batch(
                policy, prompt_ids[start : start + per_batch], g, max_new_tokens, temperature, top_p,
                tokenizer.eos_token_id, tokenizer.pad_token_id, generator, top_k,
            )  # fmt: skip
    return out


@torch.no_grad()
def score_tokens(
    policy: PreTrainedModel,
    reference: Callable[[], Any] | None,
    value_model: PreTrainedModel | None,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    groups: list[int],
    pad_token_id: int,
    shared_prefix: bool,
    batch_size: int,
    need_old: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(N, T) old log-probs and entropy of the policy, the reference's log-probs (``reference()`` is a
    context manager yielding the reference model), and the value model's values, in micro-batches.

    Without ``need_old`` the policy pass is skipped (old log-probs and entropy are None): with one update
    per rollout and the KL outside the reward, pi_old is the policy of that update's own forward pass."""
    device = next(policy.parameters()).device
    width = max(len(c) for c in completion_ids)
    parts: dict[str, list[torch.Tensor]] = {"old": [], "entropy": [], "ref": [], "values": []}
    for start in range(0, len(prompt_ids), batch_size):
        part = slice(start, start + batch_size)
        packed = pack_completions(
            prompt_ids[part], completion_ids[part], groups[part], pad_token_id, shared_prefix
        )
        packed.width = width
        packed = packed.to(device)
        if need_old:
            with eval_mode(policy):
                logps, entropy = policy_token_logprobs(policy, packed, with_entropy=True)
            parts["old"].append(to_grid(logps.float(), packed).cpu())
            parts["entropy"].append(to_grid(entropy.float(), packed).cpu())
        if reference is not None:
            with reference() as ref_model, eval_mode(ref_model):
                ref_logps, _ = policy_token_logprobs(ref_model, packed)
            parts["ref"].append(to_grid(ref_logps.float(), packed).cpu())
        if value_model is not None:
            with eval_mode(value_model):
                parts["values"].append(to_grid(value_token_values(value_model, packed), packed).cpu())
    joined = {k: torch.cat(v) if v else None for k, v in parts.items()}
    return joined["old"], joined["entropy"], joined["ref"], joined["values"]
