"""KL divergence of a candidate policy to a reference policy, estimated from samples (book ch.15).

    KL(pi || pi_ref) = E_{x, y ~ pi(.|x)} [ sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ]

The k1 estimator (:func:`rlhf_core.losses.kl.sampled_kl`; Schulman's note, book §16.2): sample
completions y from pi itself (temperature 1, no nucleus cut, no processors: the native decoding loop
samples the model's own softmax), and average the summed per-token log-ratios. It is unbiased only
for samples drawn from pi: completions decoded greedily or at another temperature would estimate
something else, and a single estimate can be negative. Completions stop at EOS or after
``max_new_tokens``, so the figure is the KL of the first ``max_new_tokens`` tokens (the sequence KL
when every sample ends before the cap).

The interval is the percentile bootstrap over prompts of each prompt's mean over its samples.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.evaluation.statistics import figure_with_interval
from rlhf_core.losses.kl import sampled_kl
from rlhf_core.modeling.completion_scoring import (
    can_share_prefix,
    completion_mask,
    pack_completions,
    policy_token_logprobs,
    to_grid,
)
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.rollout.generation import chat_prompt, decode_batch


@torch.no_grad()
def sample_token_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list,
    n: int,
    *,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids) of ``n`` samples per prompt from the model at temperature 1,
    prompt-major; prompts are batched in token-length order and pre-filled once per prompt."""
    encoded = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    per_batch = max(1, batch_size // n)
    device = next(model.parameters()).device
    seeds = torch.Generator().manual_seed(seed)
    completions: list[list[int]] = [[] for _ in range(len(prompts) * n)]
    with eval_mode(model):
        for start in range(0, len(order), per_batch):
            batch = order[start : start + per_batch]
            generator = torch.Generator(device=device).manual_seed(
                int(torch.randint(0, 2**31 - 1, (1,), generator=seeds))
            )
            rows = decode_batch(
                model, [encoded[i] for i in batch], n, max_new_tokens, 1.0, 1.0, tokenizer.eos_token_id,
                tokenizer.pad_token_id, generator,
            )  # fmt: skip
            for k, i in enumerate(batch):
                completions[i * n : (i + 1) * n] = rows[k * n : (k + 1) * n]
    return [encoded[i // n] for i in range(len(completions))], completions


@torch.no_grad()
def sequence_log_ratios(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    groups: list[int],
    *,
    pad_token_id: int,
    batch_size: int = 64,
) -> list[float]:
    """Per completion: sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) (the k1 term).

    ``groups[i]`` names the prompt of sequence i: a prompt's samples share one row where both models
    support shared-prefix rows (:func:`~rlhf_core.modeling.completion_scoring.pack_completions`).
    """
    shared = can_share_prefix(policy, reference)
    device = next(policy.parameters()).device
    out: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        part = slice(start, start + batch_size)
        packed = pack_completions(prompt_ids[part], completion_ids[part], groups[part], pad_token_id, shared)
        packed = packed.to(device)
        with eval_mode(policy), eval_mode(reference):
            logp, _ = policy_token_logprobs(policy, packed)  # (N,) over all completion tokens
            logp_ref, _ = policy_token_logprobs(reference, packed)
        mask = completion_mask([len(c) for c in completion_ids[part]], packed.width)
        grids = [to_grid(x.double(), packed).cpu() for x in (logp, logp_ref)]  # (B, T) each
        out += sampled_kl(*grids, mask).tolist()
    return out


def kl_metrics(log_ratios: list[float], samples_per_prompt: int, seed: int) -> dict[str, float]:
    """``eval/kl_to_reference``: the mean k1 estimate, with its interval over prompts (``_n``: prompts)."""
    n = samples_per_prompt
    per_prompt = [sum(log_ratios[i : i + n]) / n for i in range(0, len(log_ratios), n)]
    return figure_with_interval("eval/kl_to_reference", per_prompt, seed)


def kl_to_reference(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list,
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """Sample from ``policy`` at temperature 1, score the samples under both models, average the k1 terms."""
    n = samples_per_prompt
    prompt_ids, completion_ids = sample_token_ids(
        policy, tokenizer, prompts, n, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed
    )
    groups = [i // n for i in range(len(prompt_ids))]
    ratios = sequence_log_ratios(
        policy, reference, prompt_ids, completion_ids, groups, pad_token_id=tokenizer.pad_token_id,
        batch_size=batch_size,
    )  # fmt: skip
    return kl_metrics(ratios, n, seed)
