"""The ``evaluate`` stage: held-out loss, verifiable accuracy, best-of-N and a table of samples."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf_core.rewards import VERIFIERS
from rlhf_core.spec.base import StageSpec, Strict
from rlhf_core.spec.decoding import GenerationSpec, SamplingSpec
from rlhf_core.spec.references import REPORT, PolicyModel, PromptsData, RefType, SFTData
from rlhf_core.spec.reward_sources import RewardSourceSpec


class BestOfNSpec(Strict):
    """Best-of-N evaluation: N samples per prompt, answer with the one the reward sources rank first."""

    n: int = Field(default=8, ge=2, description="Completions sampled per prompt.")
    rewards: tuple[RewardSourceSpec, ...] = Field(
        min_length=1, description="Reward sources that rank the N samples (weighted sum)."
    )
    generation: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling settings.")


class EvaluateStage(StageSpec):
    """Held-out loss/perplexity, verifiable accuracy and a table of sample generations."""

    kind: Literal["evaluate"]
    models: tuple[PolicyModel, ...] = Field(
        min_length=1, description="Models to evaluate (stages or `models:` entries)."
    )
    data: SFTData | None = Field(
        default=None, description="SFT dataset whose eval split gives loss/perplexity."
    )
    prompts: PromptsData | None = Field(
        default=None, description="Prompts dataset with answers for accuracy."
    )
    verifier: str = Field(
        default="arithmetic_exact",
        description="Registered verifier (a reward function giving 1 for a correct answer, else 0).",
    )
    max_prompts: int = Field(default=200, ge=1, description="Evaluate on at most this many prompts.")
    samples_in_table: int = Field(default=8, ge=0, description="Generations shown in the samples table.")
    max_length: int = Field(default=512, ge=8, description="Longest eval conversation (tokens) for the loss.")
    generation: GenerationSpec = Field(default_factory=GenerationSpec, description="Decoding settings.")
    rewards: tuple[RewardSourceSpec, ...] = Field(
        default=(),
        description=(
            "Reward sources (reward models, functions) that also score each model's completions of the "
            "prompts: their mean is reported per source (eval/reward/<source>), e.g. to see whether RL "
            "raised a reward model's score and whether the verifier agrees."
        ),
    )
    best_of_n: BestOfNSpec | None = Field(
        default=None,
        description="Also report best-of-N accuracy (needs prompts): pass@1, best-of-N and pass@N.",
    )

    outputs: ClassVar[dict[str, RefType]] = {"report": REPORT}

    @model_validator(mode="after")
    def _needs_something_to_measure(self) -> EvaluateStage:
        if self.data is None and self.prompts is None:
            raise ValueError("give `data` (for loss/perplexity), `prompts` (for accuracy), or both")
        if self.rewards and self.prompts is None:
            raise ValueError("rewards score the models' completions of the prompts: give prompts")
        if self.best_of_n is not None and self.prompts is None:
            raise ValueError("best_of_n needs `prompts` (a prompts dataset with answers to verify)")
        if self.verifier not in VERIFIERS:
            known = ", ".join(sorted(VERIFIERS))
            raise ValueError(f"unknown verifier '{self.verifier}' (registered verifiers: {known})")
        return self
