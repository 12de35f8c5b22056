"""The pieces both rollout-engine benchmarks time: sampling with one engine, and one GRPO-shaped step.

Sampling (``sample_with``): ``n`` completions of each prompt at a fixed ``max_new_tokens``, by

- ``native``: the project's KV-cached loop (``generate(..., engine="native")``, text prompts in);
- ``transformers``: ``model.generate`` per batch (``generate(..., engine="transformers")``);
- ``vllm``: an already started :class:`~rlhf_core.rollout.engines.vllm_engine.VLLMEngine`; its timed
  region includes rendering and encoding the prompts and decoding the completions to text, as
  ``generate`` does for the other two.

A GRPO-shaped step (``grpo_step``, book ch.6: group-relative advantages, clipped surrogate) is what an
on-policy trainer does once per rollout, each part timed on its own:

1. generation: G completions of each of P prompts (the engine, or the native loop on the policy);
2. reward: a cheap placeholder score per completion (the share of digit characters in its text), only
   there so that advantages, and so the update, are not zero for a random-init policy;
3. scoring: the policy's log-probs of the sampled tokens without gradient (the pi_old / mismatch pass a
   trainer runs when it compares the engine's log-probs with its own, book ch.6 on truncated importance
   sampling); optional;
4. update: forward and backward of the clipped surrogate over the rollout in micro-batches, gradient
   clipping and one AdamW step;
5. weight sync: the engine is handed the new weights (0 for the native loop, which decodes the policy
   itself).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.losses.advantages import group_advantages
from rlhf_core.losses.masking import aggregate_loss
from rlhf_core.losses.policy_gradient import clipped_surrogate_loss
from rlhf_core.modeling.completion_scoring import (
    can_share_prefix,
    completion_mask,
    pack_completions,
    policy_token_logprobs,
    to_grid,
)
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.rollout.engines.base import SamplingRequest
from rlhf_core.rollout.generation import generate
from rlhf_core.rollout.token_scoring import encode_prompts, sample_groups

CLIP_EPS = 0.2  # PPO / GRPO clip range, both sides


def synchronize() -> None:
    """Wait for queued GPU work, so a timer stops when the work has finished."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def stopwatch(times: dict[str, float], key: str):
    """Add the seconds of the ``with`` block (GPU work included) to ``times[key]``."""
    synchronize()
    started = time.perf_counter()
    try:
        yield
    finally:
        synchronize()
        times[key] = times.get(key, 0.0) + time.perf_counter() - started


@dataclass
class Sampled:
    """What one sampling call produced and how long it took."""

    new_tokens: int  # generated tokens, up to and including EOS, summed over completions
    sequences: int
    seconds: float


def sample_with(
    engine: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
    vllm_engine=None,
) -> Sampled:
    """``n`` completions of each prompt with ``engine`` (``native``, ``transformers`` or ``vllm``), timed."""
    synchronize()
    started = time.perf_counter()
    if engine == "vllm":
        request = SamplingRequest(max_new_tokens, temperature, eos_token_id=tokenizer.eos_token_id)
        out = vllm_engine.generate(encode_prompts(tokenizer, prompts), n, request, seed)
        tokenizer.batch_decode(out.token_ids, skip_special_tokens=True)
        lengths = [len(t) for t in out.token_ids]
    else:
        out = generate(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, samples_per_prompt=n,
            temperature=temperature, batch_size=batch_size, seed=seed, engine=engine,
        )  # fmt: skip
        lengths = out.new_tokens
    synchronize()
    return Sampled(sum(lengths), len(lengths), time.perf_counter() - started)


def digit_share_rewards(tokenizer: PreTrainedTokenizerBase, completions: list[list[int]]) -> torch.Tensor:
    """(N,) share of digit characters in each completion's text: a placeholder reward that varies between
    the samples of a random-init policy (the arithmetic verifier would score them all 0)."""
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return torch.tensor([sum(c.isdigit() for c in t) / max(1, len(t)) for t in texts])


@dataclass
class StepSettings:
    group_size: int  # G completions per prompt
    max_new_tokens: int
    temperature: float
    batch_size: int  # sequences decoded together by the native loop
    micro_batch: int  # prompt groups per forward/backward of the update (and of scoring)
    score: bool  # run the no-gradient scoring pass (pi_old / mismatch)
    autocast_bf16: bool = False  # forward passes of the native loop, scoring and update in bf16 autocast


def grpo_step(
    policy: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    settings: StepSettings,
    seed: int,
    engine=None,
) -> tuple[dict[str, float], int]:
    """One rollout and one optimizer step; returns seconds per part and the completion tokens generated.

    ``engine`` None decodes with the native loop on the policy; else it is a started rollout engine,
    synced after the update."""
    s, times = settings, {}
    autocast = _autocast(policy, s.autocast_bf16)
    with stopwatch(times, "generation"):
        completions = _generate_group(policy, tokenizer, prompt_ids, s, seed, engine, autocast)
    if engine is not None:
        with stopwatch(times, "release"):
            engine.release_memory()  # colocated with sleep mode: the engine frees the device for the update
    with stopwatch(times, "reward"):
        rewards = digit_share_rewards(tokenizer, completions)
        advantages = group_advantages(rewards, s.group_size, "grpo")  # (N,)
    prompts = [p for p in prompt_ids for _ in range(s.group_size)]
    groups = [i // s.group_size for i in range(len(prompts))]
    chunks = _micro_batches(len(prompts), s.micro_batch * s.group_size)
    shared = can_share_prefix(policy)
    old = None
    if s.score:
        with stopwatch(times, "scoring"), torch.no_grad(), eval_mode(policy), autocast():
            old = [
                _token_logprobs(policy, prompts, completions, groups, part, tokenizer, shared).detach()
                for part in chunks
            ]
    with stopwatch(times, "update"):
        _update(
            policy,
            optimizer,
            tokenizer,
            prompts,
            completions,
            groups,
            advantages,
            chunks,
            shared,
            old,
            autocast,
        )
    if engine is not None:
        with stopwatch(times, "weight_sync"):
            engine.sync_weights()
    return times, sum(len(c) for c in completions)


def _generate_group(
    policy, tokenizer, prompt_ids, s: StepSettings, seed, engine, autocast
) -> list[list[int]]:
    if engine is not None:
        request = SamplingRequest(s.max_new_tokens, s.temperature, eos_token_id=tokenizer.eos_token_id)
        return engine.generate(prompt_ids, s.group_size, request, seed).token_ids
    with autocast():
        return sample_groups(
            policy, tokenizer, prompt_ids, s.group_size, max_new_tokens=s.max_new_tokens,
            temperature=s.temperature, top_p=1.0, batch_size=s.batch_size, seed=seed,
        )  # fmt: skip


def _token_logprobs(policy, prompts, completions, groups, part: slice, tokenizer, shared) -> torch.Tensor:
    """(B, T) log pi(a_t) of the completions in ``part`` (T: their longest), with gradient if enabled."""
    packed = pack_completions(
        prompts[part], completions[part], groups[part], tokenizer.pad_token_id, shared
    ).to(next(policy.parameters()).device)
    logps, _ = policy_token_logprobs(policy, packed)
    return to_grid(logps.float(), packed)


def _update(
    policy, optimizer, tokenizer, prompts, completions, groups, advantages, chunks, shared, old, autocast
):
    """Clipped surrogate (token-mean per micro-batch, weighted by its token share), AdamW step."""
    device = next(policy.parameters()).device
    total_tokens = sum(len(c) for c in completions)
    policy.train()
    for k, part in enumerate(chunks):
        with autocast():
            logps = _token_logprobs(policy, prompts, completions, groups, part, tokenizer, shared)  # (B, T)
        lengths = [len(c) for c in completions[part]]
        mask = completion_mask(lengths, logps.shape[1], device)
        old_logps = logps.detach() if old is None else old[k].to(device)  # one update per rollout: rho = 1
        loss = clipped_surrogate_loss(logps, old_logps, advantages[part].to(device), mask, CLIP_EPS, CLIP_EPS)
        weight = sum(lengths) / total_tokens
        (aggregate_loss(loss.per_token, mask, "token") * weight).backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    policy.eval()


def _micro_batches(count: int, size: int) -> list[slice]:
    return [slice(start, min(count, start + size)) for start in range(0, count, size)]


def _autocast(policy: PreTrainedModel, bf16: bool) -> Callable[[], contextlib.AbstractContextManager]:
    device_type = next(policy.parameters()).device.type
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type, dtype=torch.bfloat16)
