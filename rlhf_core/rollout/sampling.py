"""N completions per prompt row (book ch.9), as the rows of a completions dataset.

Rows: ``prompt_index``, ``prompt``, ``answer`` (when the prompt has one), ``completion_index``,
``completion`` and ``new_tokens``; the reward sources add ``scores`` (source name -> r_s) and the
composite ``reward`` sum_s w_s * r_s (:func:`rlhf_core.rewards.composite.score_completions`).
``sample_and_score`` is the ``sample`` stage's work (``run(stage, inputs, env)``), model loading
included; it reads the stage through :class:`SampleSettings` (the spec's ``SampleStage`` is one), so
the spec stays above this package.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.modeling.models import load_model
from rlhf_core.rewards.composite import (
    ModelScorer,
    RewardSource,
    model_source_options,
    reward_metric_means,
    score_completions,
)
from rlhf_core.rewards.reward_model_scoring import load_reward_model_scorers
from rlhf_core.rollout.engines.base import RolloutEngine
from rlhf_core.rollout.engines.opening import VLLMSettings, open_engine
from rlhf_core.rollout.episode_sampling import EnvironmentSettings, add_environment_rewards, sample_episodes
from rlhf_core.rollout.generation import Engine, generate
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.stage_results import StageResult


class SamplingSettings(Protocol):
    """The decoding settings :func:`sample_completions` reads (the spec's ``SamplingSpec`` is one)."""

    @property
    def max_new_tokens(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def batch_size(self) -> int: ...  # sequences decoded together (prompts x samples)
    @property
    def engine(self) -> Engine: ...
    @property
    def vllm(self) -> VLLMSettings: ...


class SampleSettings(Protocol):
    """What the ``sample`` stage's work reads of the stage (the spec's ``SampleStage`` is one)."""

    @property
    def n(self) -> int: ...  # completions per prompt
    @property
    def max_prompts(self) -> int | None: ...  # None: every prompt row
    @property
    def generation(self) -> SamplingSettings: ...
    @property
    def rewards(self) -> Sequence[RewardSource]: ...
    @property
    def on_invalid_reward(self) -> str: ...  # 'fail' or 'skip'
    @property
    def environment(self) -> EnvironmentSettings | None: ...  # multi-turn episodes instead of completions


@dataclass(frozen=True)
class SampleInputs:
    """The ``sample`` stage's resolved inputs: the policy, the prompt rows of its split, and the reward
    models by source name (``rm:<stage>``)."""

    policy_dir: str  # a local directory or a hub name
    policy_revision: str | None
    prompt_rows: list[dict]
    reward_model_dirs: dict[str, str] = field(default_factory=dict)
    # scorers the caller built for reward sources that are not reward models (judges behind endpoints)
    other_scorers: dict[str, ModelScorer] = field(default_factory=dict)


@dataclass
class SampleResult(StageResult):
    rows: list[dict]  # scored completion rows, the dropped ones left out
    generated_tokens: int
    generation_seconds: float
    problems: list[str] = field(default_factory=list)  # one line per completion dropped for its reward

    @property
    def columns(self) -> tuple[str, ...]:
        """Columns present in every row."""
        return tuple(sorted(set.intersection(*(set(r) for r in self.rows)))) if self.rows else ()

    def summary(self) -> dict[str, float]:
        """Headline numbers: completions kept and dropped, reward mean/std, decoding throughput, and the
        mean of each extra metric the reward functions returned (``reward/<source>/<metric>``)."""
        rewards = [r["reward"] for r in self.rows]
        seconds = self.generation_seconds
        return {
            "completions": float(len(self.rows)),
            "dropped": float(len(self.problems)),
            "reward_mean": statistics.fmean(rewards) if rewards else float("nan"),
            "reward_std": statistics.pstdev(rewards) if rewards else float("nan"),
            "new_tokens_per_second": self.generated_tokens / seconds if seconds else 0.0,
            **{f"reward/{name}": mean for name, mean in reward_metric_means(self.rows).items()},
        }


def sample_and_score(stage: SampleSettings, inputs: SampleInputs, env: StageEnvironment) -> SampleResult:
    """The ``sample`` stage's work: ``stage.n`` completions of each of the first ``stage.max_prompts``
    prompt rows (all when None) from the policy, scored by the ``stage.rewards`` sources; a completion
    with a non-finite reward fails the stage or is dropped and reported (``stage.on_invalid_reward``)."""
    rows = inputs.prompt_rows[: stage.max_prompts] if stage.max_prompts else inputs.prompt_rows
    model, tokenizer = load_model(inputs.policy_dir, revision=inputs.policy_revision)
    with open_engine(stage.generation, model, tokenizer, stage=env.stage, log_dir=env.work_dir) as engine:
        if stage.environment is not None:
            sampled, tokens, seconds = sample_episodes(
                model, tokenizer, rows, stage.n, stage.generation, stage.environment, env.seed,
                stage=env.stage, engine=engine if not isinstance(engine, str) else None,
            )  # fmt: skip
        else:
            sampled, tokens, seconds = sample_completions(
                model, tokenizer, rows, stage.n, stage.generation, env.seed, engine=engine
            )
    options = model_source_options(stage.rewards)
    scorers = load_reward_model_scorers(inputs.reward_model_dirs, options) | inputs.other_scorers
    kept, problems = score_completions(
        sampled, stage.rewards, scorers, on_invalid=stage.on_invalid_reward, stage=env.stage
    )
    return SampleResult(add_environment_rewards(kept), tokens, seconds, problems)


def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_rows: list[dict],
    n: int,
    cfg: SamplingSettings,
    seed: int,
    engine: str | RolloutEngine | None = None,
) -> tuple[list[dict], int, float]:
    """N completions per prompt row, each row carrying every column of its prompt row; returns (rows
    without scores, generated tokens, seconds). ``engine``: an open rollout engine (default: the
    in-process loop ``cfg.engine`` names)."""
    started = time.perf_counter()
    out = generate(  # prompt-major: the N samples of prompt i at i*N .. i*N+N-1
        model,
        tokenizer,
        [row["prompt"] for row in prompt_rows],
        samples_per_prompt=n,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        batch_size=cfg.batch_size,
        seed=seed,
        engine=engine or cfg.engine,
    )
    seconds = time.perf_counter() - started
    rows = []
    for flat, (text, length) in enumerate(zip(out.texts, out.new_tokens, strict=True)):
        i, j = divmod(flat, n)
        record = prompt_rows[i]
        # every column of the prompt row travels with its completions: verifiers read answers, tests
        row = {"prompt_index": i, "completion_index": j, "completion": text, "new_tokens": length}
        rows.append({**record, **row})
    return rows, sum(out.new_tokens), seconds
