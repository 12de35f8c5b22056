"""On-policy RL over multi-turn episodes (book ch.13): a rollout's "completions" are whole episodes of the
stage's environment.

Each of a round's prompts gets G episodes (one environment each); a completion's tokens are everything
after the first context (the model's turns and the environment's messages between them) and its
``action_mask`` marks the model's own tokens, so log-probs, KL, advantages and the loss count only those
(:class:`~.samples.Samples`). The reward is the stage's reward sources on the final answer (the rows
carry the whole conversation in ``messages`` for a user's function that wants it) plus the environment's
own per-turn rewards, summed; it sits on the episode's last token (the model's). An episode cut at
``max_new_tokens`` inside a turn is *truncated* (the stage's ``truncated`` rule applies); one that reached
the turn limit or the context limit is scored as it stands. The overlong penalty (DAPO) looks at the
episode's longest turn.

The native loop decodes chunk by chunk, each chunk's episodes from the chunk's own seed (as single-turn
sampling does), so several processes sample exactly what one does; an engine gets all of them at once.
"""

from __future__ import annotations

import math
import statistics

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.rollout.engines.base import RolloutEngine
from rlhf_core.rollout.episode_sampling import (
    ENVIRONMENT_SOURCE,
    environment_label,
    episode_limits,
    episode_row,
    turn_decoder,
)
from rlhf_core.rollout.episodes import EpisodeRecord, Trajectory, run_episodes
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.training.policy_gradient.rollouts import RewardFn, reward_completions
from rlhf_core.training.policy_gradient.samples import Samples


def sample_and_reward_episodes(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    chunks: list,  # SamplingChunk (rollout_sampling imports this module)
    stage: PolicyGradientStage,
    reward_fn: RewardFn,
    seeds: list[int],
    engine: RolloutEngine | None,
    stage_name: str,
) -> Samples:
    """G rewarded episodes of each prompt of ``chunks`` (in their order); ``seeds[k]``: chunk k's seed."""
    environment, g = stage.environment, stage.effective_group_size
    assert environment is not None
    make, limits = environment.factory(), episode_limits(environment, policy)
    decode = turn_decoder(policy, tokenizer, stage.generation, engine)
    where = f"stage '{stage_name}', environment '{environment_label(environment.name)}'"
    batches = [chunks] if engine is not None else [[chunk] for chunk in chunks]
    batch_seeds = seeds[:1] if engine is not None else seeds
    trajectories: list[Trajectory] = []
    for batch, seed in zip(batches, batch_seeds, strict=False):
        indices = [i for chunk in batch for i in chunk.prompt_indices for _ in range(g)]
        trajectories += run_episodes(
            decode, tokenizer, [make() for _ in indices], records, indices, limits, seed=seed, where=where,
            max_new_tokens=stage.generation.max_new_tokens,
        )  # fmt: skip
    return reward_episodes(trajectories, records, stage, reward_fn, engine is not None)


def reward_episodes(
    trajectories: list[Trajectory],
    records: list[dict],
    stage: PolicyGradientStage,
    reward_fn: RewardFn,
    engine_logps: bool,
) -> Samples:
    """The samples of ``trajectories`` (G per prompt, prompt-major), rewarded."""
    g = stage.effective_group_size
    counts = sorted({name for t in trajectories for name in t.metrics})
    rows = []
    for k, t in enumerate(trajectories):
        row = episode_row(t, records[t.row_index], t.row_index, k % g, counts)
        rows.append({**row, "completion_tokens": max(t.turn_tokens, default=0)})
    truncated = [t.truncated for t in trajectories]
    rewards, per_source = reward_completions(rows, truncated, stage, reward_fn)
    from_environment = [t.environment_reward for t in trajectories]
    if any(r is not None for r in from_environment):
        extra = torch.tensor([r or 0.0 for r in from_environment], dtype=rewards.dtype)
        rewards = rewards + extra
        per_source[ENVIRONMENT_SOURCE] = [math.nan if r is None else r for r in from_environment]
    return Samples(
        [t.prompt_ids for t in trajectories],
        [t.response_ids for t in trajectories],
        [k // g for k in range(len(trajectories))],
        truncated,
        rewards,
        per_source,
        [t.final_answer for t in trajectories],
        [records[t.row_index]["prompt"] for t in trajectories],
        [t.logps or [0.0] * len(t.response_ids) for t in trajectories] if engine_logps else None,
        action_masks=[list(t.action_mask) for t in trajectories],
        episodes=[EpisodeRecord.of(t) for t in trajectories],
    )


def episode_metrics(samples: Samples) -> dict[str, float]:
    """``episode/...`` of a rollout: turns, the model's and the environment's tokens per episode, the share
    of each outcome, and the mean of each count the environment reported (tool calls, invalid calls...)."""
    episodes = samples.episodes or []
    if not episodes:
        return {}
    model_tokens = samples.model_token_counts
    metrics = {
        "episode/turns": statistics.fmean(e.turns for e in episodes),
        "episode/model_tokens": statistics.fmean(model_tokens),
        "episode/environment_tokens": statistics.fmean(
            total - own for total, own in zip(samples.lengths, model_tokens, strict=True)
        ),
    }
    for outcome in ("done", "turn_limit", "length", "context_limit"):
        metrics[f"episode/{outcome}_share"] = statistics.fmean(float(e.outcome == outcome) for e in episodes)
    for name in sorted({n for e in episodes for n in e.metrics}):
        metrics[f"episode/{name}"] = statistics.fmean(e.metrics.get(name, 0.0) for e in episodes)
    return metrics
