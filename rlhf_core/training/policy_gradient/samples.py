"""What a rollout's sampling produced (book ch.6): completions (or multi-turn episodes, ch.13), prompt-major,
with their rewards, and what the update needs to know about each token (whose it is)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_core.losses.advantages import sequence_rewards_to_tokens
from rlhf_core.modeling.completion_scoring import completion_mask
from rlhf_core.rollout.episodes import EpisodeRecord


@dataclass
class Samples:
    """Sampled and rewarded completions, prompt-major (the G completions of a prompt together)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    groups: list[int]  # which prompt (0, 1, ...) each completion answers
    truncated: list[bool]
    rewards: torch.Tensor  # (N,) final scalar reward (after the truncation rule and overlong penalty)
    source_scores: dict[str, list[float]]  # NaN where a source did not score the completion
    texts: list[str]
    prompts: list[Any]
    engine_logps: list[list[float]] | None = None  # the rollout engine's log pi per sampled token
    versions: list[int] | None = None  # the policy version (rollout index) that sampled each completion
    # multi-turn episodes (book ch.13): True on the model's own tokens of each completion (the environment's
    # messages between its turns are False: never trained), and each episode's conversation and counts
    action_masks: list[list[bool]] | None = None
    episodes: list[EpisodeRecord] | None = None

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completion_ids]

    @property
    def model_token_counts(self) -> list[int]:
        """Tokens the policy wrote per completion (all of them, unless an environment spoke in between)."""
        if self.action_masks is None:
            return self.lengths
        return [sum(m) for m in self.action_masks]

    def token_rewards(self, mask: torch.Tensor) -> torch.Tensor:
        """(N, T) per-token rewards for PPO: each completion's reward on its last own token, except that an
        environment's per-turn rewards (book ch.13) sit on the last token of the turn they reward."""
        out = sequence_rewards_to_tokens(self.rewards.float(), mask)
        for i, episode in enumerate(self.episodes or []):
            if episode.turn_rewards:
                last = int(torch.nonzero(mask[i]).max())
                for position, reward in episode.turn_rewards:
                    out[i, last] -= reward
                    out[i, position] += reward
        return out

    def token_mask(self, ids: list[int], width: int, device: torch.device | None = None) -> torch.Tensor:
        """(len(ids), width) True on the policy's own tokens of completions ``ids`` (right-padded)."""
        mask = completion_mask([self.lengths[i] for i in ids], width, device)
        if self.action_masks is None:
            return mask
        grid = torch.zeros((len(ids), width), dtype=torch.bool)
        for row, i in enumerate(ids):
            actions = self.action_masks[i][:width]
            grid[row, : len(actions)] = torch.tensor(actions, dtype=torch.bool)
        return mask & grid.to(mask.device)

    def select_groups(self, keep: list[int]) -> Samples:
        """Only the completions of the groups ``keep``, renumbered 0, 1, ... in that order."""
        new_group = {g: k for k, g in enumerate(keep)}
        rows = [i for g in keep for i, gi in enumerate(self.groups) if gi == g]
        return Samples(
            [self.prompt_ids[i] for i in rows],
            [self.completion_ids[i] for i in rows],
            [new_group[self.groups[i]] for i in rows],
            [self.truncated[i] for i in rows],
            self.rewards[rows],
            {name: [scores[i] for i in rows] for name, scores in self.source_scores.items()},
            [self.texts[i] for i in rows],
            [self.prompts[i] for i in rows],
            None if self.engine_logps is None else [self.engine_logps[i] for i in rows],
            None if self.versions is None else [self.versions[i] for i in rows],
            None if self.action_masks is None else [self.action_masks[i] for i in rows],
            None if self.episodes is None else [self.episodes[i] for i in rows],
        )

    @staticmethod
    def concat(parts: list[Samples]) -> Samples:
        offset, groups = 0, []
        for part in parts:
            groups += [g + offset for g in part.groups]
            offset += max(part.groups, default=-1) + 1
        return Samples(
            [x for p in parts for x in p.prompt_ids],
            [x for p in parts for x in p.completion_ids],
            groups,
            [x for p in parts for x in p.truncated],
            torch.cat([p.rewards for p in parts]),
            {  # a metric one part lacks (none of its rows was scored) is NaN there
                name: [x for p in parts for x in p.source_scores.get(name, [math.nan] * len(p.texts))]
                for name in dict.fromkeys(n for p in parts for n in p.source_scores)
            },
            [x for p in parts for x in p.texts],
            [x for p in parts for x in p.prompts],
            None
            if any(p.engine_logps is None for p in parts)
            else [x for p in parts for x in p.engine_logps],
            None if any(p.versions is None for p in parts) else [x for p in parts for x in p.versions],
            None
            if any(p.action_masks is None for p in parts)
            else [x for p in parts for x in p.action_masks],
            None if any(p.episodes is None for p in parts) else [x for p in parts for x in p.episodes],
        )
