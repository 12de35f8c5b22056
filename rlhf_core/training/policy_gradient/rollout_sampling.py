"""Sampling the completions of a rollout (book ch.6): rounds of prompts, each sampled G times and rewarded.

A rollout is made of sampling *rounds* of ``prompts_per_rollout`` prompts, read from the stage's prompt
stream: one round, or more under dynamic sampling (DAPO), which keeps only the groups whose rewards
differ and samples further rounds until the rollout is full (:func:`sample_rollout`). Where a round's
completions come from is a :class:`RoundSource`:

- :class:`SynchronousRounds`: sampled when asked, by the current policy (the native loop, or a rollout
  engine holding its weights), so every completion comes from the weights being trained (version =
  the rollout's index). With several processes each rank samples its chunks of the round
  (:mod:`.rank_sharing`) and the round is gathered.
- asynchronous rounds (:mod:`.async_rollouts`): generated ahead by a background producer, at most
  ``max_staleness`` policy versions behind.

Every completion records the version of the policy that sampled it (``Samples.versions``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.errors import UserError
from rlhf_core.losses.advantages import all_equal_groups
from rlhf_core.rollout.engines.base import RolloutEngine, SamplingRequest, prompt_seeds
from rlhf_core.rollout.engines.weight_export import plain_state_dict
from rlhf_core.rollout.token_scoring import encode_prompts, sample_groups
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.training.policy_gradient.async_rollouts import AsyncRolloutProducer, RoundRequest, is_stale
from rlhf_core.training.policy_gradient.episode_rollouts import sample_and_reward_episodes
from rlhf_core.training.policy_gradient.rank_sharing import gather_samples, my_chunks
from rlhf_core.training.policy_gradient.rollouts import PromptStream, RewardFn, reward_completions
from rlhf_core.training.policy_gradient.samples import Samples


@dataclass(frozen=True)
class SamplingChunk:
    """A slice of a sampling round's prompts decoded as one batch by the native loop, with a seed of its
    own (:func:`chunk_seed`): which process samples it does not change its completions."""

    index: int  # position in the round
    prompt_indices: list[int]  # rows of the prompt records


def round_chunks(prompt_indices: list[int], group_size: int, batch_size: int) -> list[SamplingChunk]:
    """The round's prompts in chunks of ``batch_size // group_size`` prompts (at least one): one decoding
    batch of the native loop each, and the unit the processes of a multi-process stage share."""
    per_chunk = max(1, batch_size // group_size)
    starts = range(0, len(prompt_indices), per_chunk)
    return [SamplingChunk(k, prompt_indices[s : s + per_chunk]) for k, s in enumerate(starts)]


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of chunk ``chunk`` of a round whose seed is ``seed``."""
    return prompt_seeds(seed, chunk + 1)[chunk]


def sample_and_reward(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    chunks: list[SamplingChunk],
    stage: PolicyGradientStage,
    reward_fn: RewardFn,
    seed: int,
    engine: RolloutEngine | None = None,
    stage_name: str = "policy_gradient",
) -> Samples:
    """G completions of each prompt of ``chunks`` (in their order), decoded by the policy (in-process:
    chunk by chunk, each from its own seed) or by the rollout ``engine`` (one call for all of them, seeded
    from the first chunk's seed; the engine keeps its own log-probs of the sampled tokens), and rewarded.
    With an environment, G episodes of each prompt (:mod:`.episode_rollouts`)."""
    if stage.environment is not None:
        seeds = [chunk_seed(seed, chunk.index) for chunk in chunks]
        return sample_and_reward_episodes(
            policy, tokenizer, records, chunks, stage, reward_fn, seeds, engine, stage_name
        )
    prompt_indices = [i for chunk in chunks for i in chunk.prompt_indices]
    prompts = [records[i]["prompt"] for i in prompt_indices]
    encoded = encode_prompts(tokenizer, prompts)
    gen, engine_logps, g = stage.generation, None, stage.effective_group_size
    if not chunks:
        completions: list[list[int]] = []
    elif engine is None:
        completions, start = [], 0
        for chunk in chunks:
            end = start + len(chunk.prompt_indices)
            completions += sample_groups(
                policy, tokenizer, encoded[start:end], g, max_new_tokens=gen.max_new_tokens,
                temperature=gen.temperature, top_p=gen.top_p, batch_size=gen.batch_size,
                seed=chunk_seed(seed, chunk.index), top_k=gen.top_k,
            )  # fmt: skip
            start = end
    else:
        request = SamplingRequest(
            gen.max_new_tokens, gen.temperature, gen.top_p, gen.top_k, tokenizer.eos_token_id
        )
        out = engine.generate(encoded, g, request, chunk_seed(seed, chunks[0].index))
        completions, engine_logps = out.token_ids, out.logprobs
    return reward_samples(
        tokenizer, records, prompt_indices, encoded, completions, engine_logps, stage, reward_fn
    )


def reward_samples(
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    prompt_indices: list[int],
    encoded: list[list[int]],
    completions: list[list[int]],
    engine_logps: list[list[float]] | None,
    stage: PolicyGradientStage,
    reward_fn: RewardFn,
) -> Samples:
    """The samples of ``completions`` (G per prompt of ``prompt_indices``, prompt-major; ``encoded``: the
    prompts' token ids), decoded and rewarded."""
    g = stage.effective_group_size
    prompts = [records[i]["prompt"] for i in prompt_indices]
    groups = [k // g for k in range(len(completions))]
    truncated = [c[-1] != tokenizer.eos_token_id for c in completions]
    texts = [t.strip() for t in tokenizer.batch_decode(completions, skip_special_tokens=True)]
    rows = [
        {**records[prompt_indices[k]], "completion": text, "completion_tokens": len(c)}
        for k, text, c in zip(groups, texts, completions, strict=True)
    ]
    rewards, per_source = reward_completions(rows, truncated, stage, reward_fn)
    return Samples(
        [encoded[k] for k in groups], completions, groups, truncated, rewards, per_source, texts,
        [prompts[k] for k in groups], engine_logps,
    )  # fmt: skip


def round_seed(seed: int, round_index: int) -> int:
    """The seed of the stage's sampling round ``round_index`` (counted over the whole run)."""
    return seed * 1_000_003 + round_index * 1_009


class RoundSource(Protocol):
    """Where the completions of a sampling round come from."""

    def sample_round(self, round_index: int, prompt_indices: list[int], version: int) -> Samples:
        """G rewarded completions of each of ``prompt_indices`` (round ``round_index`` of the run) for the
        rollout whose policy version is ``version``; ``Samples.versions`` says which weights sampled them."""
        ...


@dataclass
class SynchronousRounds:
    """Rounds sampled when asked, by the policy as it is now (in-process, or by ``engine`` given its
    weights): version = the rollout's own. With several processes, each rank samples its chunks."""

    policy: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    records: list[dict]
    stage: PolicyGradientStage
    reward_fn: RewardFn
    seed: int
    engine: RolloutEngine | None = None
    stage_name: str = "policy_gradient"

    def sample_round(self, round_index: int, prompt_indices: list[int], version: int) -> Samples:
        stage = self.stage
        chunks = round_chunks(prompt_indices, stage.effective_group_size, stage.generation.batch_size)
        local = sample_and_reward(
            self.policy, self.tokenizer, self.records, my_chunks(chunks), stage, self.reward_fn,
            seed=round_seed(self.seed, round_index), engine=self.engine, stage_name=self.stage_name,
        )  # fmt: skip
        samples = gather_samples(local, chunks)
        samples.versions = [version] * len(samples.lengths)
        return samples


@dataclass
class RolloutSamples:
    """A rollout's kept completions and how they were gathered."""

    samples: Samples
    rounds: int  # sampling rounds it took
    dropped_groups: int  # groups of equal rewards left out (dynamic sampling)
    dropped_stale: int = 0  # completions left out for being more than max_staleness versions old


def sample_rollout(
    source: RoundSource,
    prompts: PromptStream,
    stage: PolicyGradientStage,
    *,
    dynamic_sampling: bool,
    index: int,
    stage_name: str,
    max_staleness: int | None = None,
) -> RolloutSamples:
    """Rollout ``index``'s completions: one round of ``prompts_per_rollout`` prompts, or, with dynamic
    sampling, rounds until that many groups with differing rewards are kept (at most
    ``max_sampling_rounds``). Rounds are numbered over the whole run by the prompt stream's cursor.

    With ``max_staleness`` K, a round sampled by a policy more than K versions older than ``index`` is
    dropped (counted in ``dropped_stale``) and the next round taken instead; it does not count as a
    sampling round. (A producer that keeps its own bound never hands one over; this is the check.)"""
    per_round, g = stage.prompts_per_rollout, stage.effective_group_size
    kept: list[Samples] = []
    wanted, rounds, dropped, stale = per_round, 0, 0, 0
    while wanted > 0 and rounds < stage.max_sampling_rounds:
        round_index = prompts.cursor // per_round
        samples = source.sample_round(round_index, prompts.take(per_round), index)
        oldest = min(samples.versions) if samples.versions else index
        if max_staleness is not None and is_stale(oldest, index, max_staleness):
            stale += len(samples.lengths)
            continue
        rounds += 1
        if not dynamic_sampling:
            kept.append(samples)
            break
        equal = all_equal_groups(samples.rewards, g).tolist()
        informative = [k for k, same in enumerate(equal) if not same][:wanted]
        dropped += sum(equal)
        if informative:
            kept.append(samples.select_groups(informative))
            wanted -= len(informative)
    if not kept:
        raise UserError(
            f"stage '{stage_name}': rollout {index + 1}: every group of {g} completions in {rounds} "
            "sampling rounds got equal rewards, so there is nothing to learn from (dynamic sampling); "
            "raise max_sampling_rounds or check the reward sources"
        )
    samples = Samples.concat(kept)
    # every reward would be the same (distillation's per-token term still teaches)
    if all(samples.truncated) and stage.truncated != "score" and stage.distillation is None:
        raise UserError(
            f"stage '{stage_name}': rollout {index + 1}: no completion ended with EOS within "
            f"generation.max_new_tokens = {stage.generation.max_new_tokens}; raise max_new_tokens, or "
            "check that the policy was trained to end its turn (its chat template's end-of-turn token); "
            "`truncated: score` scores unfinished completions anyway"
        )
    return RolloutSamples(samples, rounds, dropped, stale)


class AsynchronousRounds:
    """Rounds generated ahead by ``engine`` in a background producer (:mod:`.async_rollouts`), at most
    ``max_staleness`` rounds ahead of the trainer, from the newest weights the trainer published.

    Round j's prompts are the stream's positions ``j * P .. j * P + P - 1`` (P = prompts_per_rollout), the
    same the trainer's :func:`sample_rollout` takes for it, so the producer needs no message from the
    trainer to plan a round. With several processes each rank's producer generates the rank's chunks of
    the round (as :class:`SynchronousRounds` samples them) and the rewarded round is gathered. The
    completions come with the generating weights' log-probs (``Samples.engine_logps``: pi_behaviour of
    the importance correction) and version. The producer starts at the first :meth:`publish` (after a
    resume: at the round the restored cursor points to) and rounds in flight are never checkpointed: a
    resumed run generates them again from the restored weights.
    """

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: PreTrainedTokenizerBase,
        records: list[dict],
        prompts: PromptStream,
        stage: PolicyGradientStage,
        reward_fn: RewardFn,
        seed: int,
        stage_name: str,
    ) -> None:
        assert stage.async_rollouts is not None
        self.engine, self.tokenizer, self.records, self.prompts = engine, tokenizer, records, prompts
        self.stage, self.reward_fn, self.seed, self.stage_name = stage, reward_fn, seed, stage_name
        self.max_staleness = stage.async_rollouts.max_staleness
        self.producer: AsyncRolloutProducer | None = None
        self.wait_s = 0.0  # seconds the trainer waited for rounds (cumulative)

    def chunks(self, round_index: int) -> list[SamplingChunk]:
        """Round ``round_index``'s sampling chunks (this rank generates and rewards its share of them)."""
        per_round, stage = self.stage.prompts_per_rollout, self.stage
        indices = self.prompts.at(round_index * per_round, per_round)
        return round_chunks(indices, stage.effective_group_size, stage.generation.batch_size)

    def plan(self, round_index: int) -> RoundRequest:
        """This rank's part of round ``round_index``: the prompts of its chunks, seeded from the first."""
        gen, mine = self.stage.generation, my_chunks(self.chunks(round_index))
        indices = [i for chunk in mine for i in chunk.prompt_indices]
        encoded = encode_prompts(self.tokenizer, [self.records[i]["prompt"] for i in indices])
        request = SamplingRequest(
            gen.max_new_tokens, gen.temperature, gen.top_p, gen.top_k, self.tokenizer.eos_token_id
        )
        seed = chunk_seed(round_seed(self.seed, round_index), mine[0].index if mine else 0)
        return RoundRequest(encoded, self.stage.effective_group_size, request, seed)

    def publish(self, version: int, policy: PreTrainedModel) -> None:
        """Hand the producer a snapshot of ``policy`` (LoRA merged, on CPU) as version ``version``."""
        if self.producer is None:
            first_round = self.prompts.cursor // self.stage.prompts_per_rollout
            self.producer = AsyncRolloutProducer(
                self.engine, self.plan, max_staleness=self.max_staleness, first_round=first_round,
                what=f"stage '{self.stage_name}'",
            )  # fmt: skip
            self.producer.start()
        self.producer.publish(version, plain_state_dict(policy))

    def sample_round(self, round_index: int, prompt_indices: list[int], version: int) -> Samples:
        """Round ``round_index`` as the producer made it (this rank's chunks), rewarded, with its version;
        with several processes, gathered from every rank."""
        assert self.producer is not None, "publish the policy's weights before taking rounds"
        got = self.producer.take(round_index)
        self.wait_s += got.wait_s
        chunks = self.chunks(round_index)
        assert [i for c in chunks for i in c.prompt_indices] == prompt_indices, "the round's prompts moved"
        mine = [i for chunk in my_chunks(chunks) for i in chunk.prompt_indices]
        encoded = encode_prompts(self.tokenizer, [self.records[i]["prompt"] for i in mine])
        local = reward_samples(
            self.tokenizer, self.records, mine, encoded, got.output.token_ids, got.output.logprobs,
            self.stage, self.reward_fn,
        )  # fmt: skip
        local.versions = [got.version] * len(local.lengths)
        return gather_samples(local, chunks)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()
