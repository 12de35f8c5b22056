"""Stages that sample from a policy and turn the samples into data (book ch.9 and ch.12):
``sample``, ``rejection_sampling`` and ``label_preferences``."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf_core.spec.base import StageSpec, Strict, check_split_fractions
from rlhf_core.spec.decoding import DecodingEngine, SamplingSpec, engine_field
from rlhf_core.spec.endpoints import EndpointJudgeSpec
from rlhf_core.spec.engines import VLLMSpec
from rlhf_core.spec.environments import EnvironmentSpec
from rlhf_core.spec.references import (
    CompletionsData,
    PolicyModel,
    PolicyOrJudgeModel,
    PromptsData,
    RefType,
    dataset_output,
)
from rlhf_core.spec.reward_sources import RewardSourceSpec


class SampleStage(StageSpec):
    """N completions per prompt from a policy, each scored by the reward sources (book ch.9); with an
    ``environment``, N multi-turn episodes per prompt (tool calls, feedback; book ch.13), each row the
    whole conversation, its final answer scored."""

    kind: Literal["sample"]
    policy: PolicyModel = Field(description="Policy model that generates.")
    prompts: PromptsData = Field(description="Prompts dataset reference, e.g. data.prompts.")
    split: str = Field(default="train", description="Split of the prompts dataset to sample from.")
    n: int = Field(default=8, ge=1, description="Completions per prompt (book: 10-30+; fewer is noisier).")
    max_prompts: int | None = Field(default=None, ge=1, description="Use at most this many prompts.")
    generation: SamplingSpec = Field(default_factory=SamplingSpec, description="Decoding settings.")
    rewards: tuple[RewardSourceSpec, ...] = Field(
        default=(),
        description="Reward sources; scores are summed (with an environment: of the final answer, plus the "
        "environment's own reward). Needed unless an environment is set.",
    )
    on_invalid_reward: Literal["fail", "skip"] = Field(
        default="fail",
        description="A NaN/inf reward: stop naming the row, or drop the completion and count it.",
    )
    environment: EnvironmentSpec | None = Field(
        default=None,
        description="Run multi-turn episodes with this environment (tools, verifier feedback, a simulated "
        "user, your own class) instead of single completions.",
    )

    outputs: ClassVar[dict[str, RefType]] = {"completions": dataset_output("completions")}

    @model_validator(mode="after")
    def _something_rewards(self) -> SampleStage:
        if not self.rewards and self.environment is None:
            raise ValueError("give at least one reward source in rewards (or an environment that rewards)")
        return self


class RejectionSamplingStage(StageSpec):
    """Keep the best completions (top per prompt or top-K overall) as an SFT dataset (book ch.9)."""

    kind: Literal["rejection_sampling"]
    completions: CompletionsData = Field(description="Completions dataset of a sample stage.")
    strategy: Literal["top_per_prompt", "top_k_overall"] = Field(
        default="top_per_prompt", description="Selection rule S(R) of the book."
    )
    k: int | None = Field(default=None, ge=1, description="How many completions top_k_overall keeps.")
    min_reward: float | None = Field(
        default=None, description="Also drop selected completions below this reward."
    )

    outputs: ClassVar[dict[str, RefType]] = {"sft": dataset_output("sft")}

    @model_validator(mode="after")
    def _k_for_top_k(self) -> RejectionSamplingStage:
        if self.strategy == "top_k_overall" and self.k is None:
            raise ValueError("strategy top_k_overall needs k")
        return self


class PolicyJudgeSpec(Strict):
    """A policy model as pairwise judge, prompted with a rubric or constitution (LLM-as-a-judge).

    Its verdicts are greedy, so every engine gives the same ones up to numerics (equal in fp32): with
    ``engine: vllm`` one vLLM engine is started from the judge model for the stage (for ``evaluate``, per
    judge) and answers every judge prompt."""

    model: PolicyOrJudgeModel = Field(
        description="Policy or judge model that judges (a stage or a `models:` entry)."
    )
    principles: tuple[str, ...] = Field(
        min_length=1, description="The rubric or constitution, one principle each."
    )
    max_new_tokens: int = Field(default=64, ge=1, description="Length of the judge's answer.")
    on_unparseable: Literal["skip", "fail"] = Field(
        default="skip", description="A verdict without [[A]]/[[B]]/[[C]]: drop and count, or stop."
    )
    engine: DecodingEngine = engine_field()
    vllm: VLLMSpec = Field(
        default_factory=VLLMSpec, description="The vLLM engine's settings (started from the judge model)."
    )


class LabelPreferencesStage(StageSpec):
    """Turn sampled completions into preference pairs labelled by a judge (AI feedback, book ch.12)."""

    kind: Literal["label_preferences"]
    completions: CompletionsData = Field(description="Completions dataset of a sample stage.")
    judge: tuple[RewardSourceSpec, ...] = Field(
        default=(), description="Reward sources that score each completion (verifier, reward model, mix)."
    )
    judge_policy: PolicyJudgeSpec | None = Field(
        default=None, description="Or: a policy model judging pairs against written principles."
    )
    judge_endpoint: EndpointJudgeSpec | None = Field(
        default=None,
        description="Or: a judge model behind an OpenAI-compatible endpoint; pairwise (principles, asked "
        "in both orders like judge_policy) or pointwise (a rubric: scores, then `pairing`).",
    )
    pairing: Literal["best_vs_worst", "all_pairs"] = Field(
        default="best_vs_worst",
        description="One pair per prompt, or every ordered pair of distinct completions.",
    )
    principles_per_comparison: int | None = Field(
        default=None,
        ge=1,
        description="A pairwise judge (judge_policy, or judge_endpoint with principles) sees this many "
        "principles per comparison, drawn without replacement (seeded by the stage seed and the pair) "
        "as in Constitutional AI's feedback step (book ch.12); recorded per pair in column `principles`. "
        "null: every principle, every time.",
    )
    min_margin: float = Field(
        default=0.0, ge=0, description="Drop pairs whose judge-score margin is smaller."
    )
    on_tie: Literal["skip", "fail"] = Field(
        default="skip", description="Equal judge scores: drop and count, or stop."
    )
    splits: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.9, "eval": 0.1}, description="Split name -> fraction of pairs."
    )

    outputs: ClassVar[dict[str, RefType]] = {"preferences": dataset_output("preference")}

    @model_validator(mode="after")
    def _one_judge_and_valid_splits(self) -> LabelPreferencesStage:
        given = [bool(self.judge), self.judge_policy is not None, self.judge_endpoint is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of judge (reward sources), judge_policy or judge_endpoint")
        check_split_fractions(self.splits)
        self._check_principles_per_comparison()
        return self

    def _check_principles_per_comparison(self) -> None:
        k = self.principles_per_comparison
        if k is None:
            return
        if self.judge_policy is not None:
            principles, where = self.judge_policy.principles, "judge_policy.principles"
        elif self.judge_endpoint is not None and self.judge_endpoint.mode == "pairwise":
            principles, where = self.judge_endpoint.principles or (), "judge_endpoint.principles"
        else:
            raise ValueError(
                "principles_per_comparison needs a pairwise judge with principles (judge_policy, or "
                "judge_endpoint with principles)"
            )
        if k > len(principles):
            raise ValueError(
                f"principles_per_comparison is {k} but {where} has {len(principles)} principle(s)"
            )
