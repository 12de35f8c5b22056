"""Rollouts of on-policy RL: sample completions from the current policy, reward them, and record what the
update needs (book ch.6).

A rollout takes the next ``prompts_per_rollout`` prompts of the stream, samples G completions of each
with the project's KV-cached decoding (the policy's chat template and EOS; the policy decodes in eval
mode and goes back to training mode), rewards each completion at its end, and computes with the same
weights, before any update, the per-token log-probs pi_old (so the importance ratio is exactly 1 at the
first update), the reference's log-probs (when beta > 0) and PPO's values. Everything is kept in a
:class:`RolloutBuffer`, which checkpoints save: a crash in the middle of a rollout's updates resumes
with the very same samples.

Generic sampling and per-token scoring on plain values live in :mod:`rlhf_core.rollout.token_scoring`;
this module adds what on-policy RL keeps about a rollout.

A completion that reaches ``max_new_tokens`` without EOS is not scored by the reward sources unless the
stage says ``truncated: score``: a reward model never silently scores an unfinished answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from rlhf_core.errors import UserError
from rlhf_core.losses.policy_gradient import soft_overlong_penalty
from rlhf_core.rewards.composite import ModelScorer, score_completions
from rlhf_core.rollout.token_scoring import score_tokens
from rlhf_core.spec.reward_sources import RewardSourceSpec
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.training.engine.loop import epoch_order
from rlhf_core.training.policy_gradient.samples import Samples

# rows (prompt, completion and the prompt record's fields) -> (composite rewards, per-source scores)
RewardFn = Callable[[list[dict]], tuple[list[float], dict[str, list[float]]]]


class PromptStream:
    """The prompts in a fresh shuffled order each epoch (a pure function of seed and epoch), read from a
    cursor that checkpoints save: resume continues at the same prompt."""

    def __init__(self, n_prompts: int, seed: int) -> None:
        if n_prompts < 1:
            raise UserError("the prompts split is empty")
        self.n, self.seed, self.cursor = n_prompts, seed, 0
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its order), computed once per epoch

    def take(self, count: int) -> list[int]:
        out = self.at(self.cursor, count)
        self.cursor += count
        return out

    def at(self, position: int, count: int) -> list[int]:
        """The prompts at stream positions ``position .. position + count - 1`` (the cursor stays; safe to
        call from a second thread: the cached order is read and replaced whole)."""
        out = []
        order = self._order
        for at in range(position, position + count):
            epoch, i = divmod(at, self.n)
            if order[0] != epoch:
                order = self._order = (epoch, epoch_order(self.n, self.seed, epoch))
            out.append(order[1][i])
        return out

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cursor = int(state["cursor"])


@dataclass
class Rollout:
    """What an update needs about one rollout: the samples and, per token, what the sampling policy, the
    reference and the value model said before any update."""

    samples: Samples
    old_logps: torch.Tensor | None  # (N, T) under the sampling policy (None: the first update's own)
    entropy: torch.Tensor | None  # (N, T) of the sampling policy (None: measured in the update)
    ref_logps: torch.Tensor | None  # (N, T)
    values: torch.Tensor | None  # (N, T) PPO value model
    metrics: dict[str, float] = field(default_factory=dict)
    engine_logps: torch.Tensor | None = None  # (N, T) the rollout engine's log-probs (None: native loop)

    @property
    def mask(self) -> torch.Tensor:
        """(N, T) True on the policy's own tokens (what carries loss, KL and advantages)."""
        samples = self.samples
        return samples.token_mask(list(range(len(samples.lengths))), max(samples.lengths))


class RolloutBuffer:
    """The current rollout and the advantages computed from it; saved with every checkpoint."""

    def __init__(self) -> None:
        self.index = -1
        self.rollout: Rollout | None = None
        self.advantages: torch.Tensor | None = None
        self.returns: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "rollout": self.rollout,
            "advantages": self.advantages,
            "returns": self.returns,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index, self.rollout = state["index"], state["rollout"]
        self.advantages, self.returns = state["advantages"], state["returns"]


def reward_function(
    sources: tuple[RewardSourceSpec, ...], model_scorers: dict[str, ModelScorer], stage_name: str
) -> RewardFn:
    """The composite reward of the stage's sources (a NaN/inf score or a raising source is an error
    naming the stage, the source and the row)."""

    def score(rows: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
        kept, _ = score_completions(rows, sources, model_scorers, on_invalid="fail", stage=stage_name)
        per_source = {s.name: [r["scores"][s.name] for r in kept] for s in sources}
        names = kept[0]["reward_metrics"] if kept else {}
        extra = {name: [r["reward_metrics"][name] for r in kept] for name in names}
        return [r["reward"] for r in kept], per_source | extra

    return score


def reward_completions(
    rows: list[dict],
    truncated: list[bool],
    stage: PolicyGradientStage,
    reward_fn: RewardFn,
) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """(N,) rewards: the reward sources on finished completions; the stage's rule on truncated ones; DAPO's
    soft overlong penalty added when configured. Sources' per-row scores are NaN where not scored."""
    scored = [i for i, cut in enumerate(truncated) if not cut or stage.truncated == "score"]
    # without reward sources (distillation alone) there is no reward for the truncation rule to replace
    fill = 0.0 if stage.truncated == "zero" or stage.rewardless else stage.truncated_reward
    rewards = torch.full((len(rows),), fill, dtype=torch.float64)
    per_source: dict[str, list[float]] = {s.name: [math.nan] * len(rows) for s in stage.rewards}
    if scored:
        values, sources = reward_fn([rows[i] for i in scored])
        for k, i in enumerate(scored):
            rewards[i] = values[k]
            for name, scores in sources.items():
                per_source.setdefault(name, [math.nan] * len(rows))[i] = scores[k]
    cache = overlong_cache(stage)
    if cache:
        lengths = torch.tensor([r["completion_tokens"] for r in rows])
        rewards = rewards + soft_overlong_penalty(lengths, stage.generation.max_new_tokens, cache)
    return rewards, per_source


@dataclass(frozen=True)
class RolloutDefaults:
    """What an algorithm turns on at the rollout unless the stage says otherwise."""

    dynamic_sampling: bool = False  # drop groups of equal rewards and sample more prompts (DAPO)
    overlong_penalty: bool = False  # a soft overlong penalty, cache max_new_tokens // 4 (DAPO)


# algorithm -> its rollout defaults; an algorithm not listed turns nothing on
ROLLOUT_DEFAULTS: dict[str, RolloutDefaults] = {
    "dapo": RolloutDefaults(dynamic_sampling=True, overlong_penalty=True),
}


def rollout_defaults(stage: PolicyGradientStage) -> RolloutDefaults:
    return ROLLOUT_DEFAULTS.get(stage.algorithm, RolloutDefaults())


def overlong_cache(stage: PolicyGradientStage) -> int | None:
    """The soft overlong penalty's cache length (tokens), or None for no penalty."""
    if stage.overlong_cache is not None:
        return stage.overlong_cache
    if rollout_defaults(stage).overlong_penalty:
        return max(1, stage.generation.max_new_tokens // 4)
    return None


def score_rollout(
    samples: Samples,
    policy: PreTrainedModel,
    reference: Callable[[], Any] | None,
    value_model: PreTrainedModel | None,
    pad_token_id: int,
    *,
    shared_prefix: bool,
    batch_size: int,
    need_old: bool = True,
) -> Rollout:
    """The rollout of ``samples``: old log-probs, entropy, reference log-probs and values per token."""
    old, entropy, ref, values = score_tokens(
        policy, reference, value_model, samples.prompt_ids, samples.completion_ids, samples.groups,
        pad_token_id, shared_prefix, batch_size, need_old,
    )  # fmt: skip
    return Rollout(samples, old, entropy, ref, values, engine_logps=engine_logp_grid(samples))


def engine_logp_grid(samples: Samples) -> torch.Tensor | None:
    """(N, T) the engine's log-probs of the sampled tokens, zero-padded; None when the native loop sampled."""
    if samples.engine_logps is None:
        return None
    width = max(samples.lengths)
    return torch.tensor([lp + [0.0] * (width - len(lp)) for lp in samples.engine_logps])
