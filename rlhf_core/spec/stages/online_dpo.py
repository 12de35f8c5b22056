"""``iterative_dpo``: R rounds of sample -> judge -> optimise from the current policy, written once.

Online / iterative DPO (Guo et al. 2024; book ch.8): each round samples completions from the current
policy, a judge (verifiers, reward models, a mix, or a policy with written principles) labels pairs,
and the policy is preference-optimised on them. The template expands, when the spec is read, into
ordinary stages, ``R x (sample, label_preferences, direct_alignment)``:

    <name>-r1-samples -> <name>-r1-pairs -> <name>-r1 -> <name>-r2-samples -> ... -> <name>

so every round is cached by its own fingerprint, a crash in round k resumes in round k, ``rlhf plan``
lists the rounds, and each round's model is registered with its lineage to the previous round. The
last round's model is the stage ``<name>`` itself (refer to it as ``<name>``; round k's as
``<name>-rk``).

Engines: with ``generation.engine: vllm`` each round's sample stage starts the engine from that round's
policy (the previous round's model), so every round samples with the current weights and no weight sync
is needed between rounds; the engine stops when its sample stage ends, freeing its memory before the
round trains. A cached round starts none. Round r samples with seed ``seed + r - 1``, a pure function of
the stage seed and the round. A ``judge_policy`` decodes with the engine its own ``engine`` names
(``vllm``: one engine started from the judge model in each round's pairs stage); the ``monitor`` decodes
with the native loop (the rounds' direct_alignment stages have no engine).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rlhf_core.spec.base import StageTemplate
from rlhf_core.spec.decoding import SamplingSpec
from rlhf_core.spec.monitor import MonitorSpec, check_monitor_proxy
from rlhf_core.spec.references import PolicyModel, PromptsData
from rlhf_core.spec.reward_sources import RewardSourceSpec
from rlhf_core.spec.stages.direct_alignment import (
    PREFERENCE_LOSSES,
    PreferenceTrainSpec,
    check_beta_of_loss,
    check_options_of_loss,
)
from rlhf_core.spec.stages.sampling import PolicyJudgeSpec


class IterativeDPOTemplate(StageTemplate):
    """Online / iterative DPO: ``rounds`` x (sample from the current policy, judge pairs, optimise)."""

    kind: Literal["iterative_dpo"]
    policy: PolicyModel = Field(description="Policy of the first round (usually the SFT model).")
    prompts: PromptsData = Field(description="Prompts to sample from each round, e.g. data.prompts.")
    rounds: int = Field(default=2, ge=1, le=50, description="Number of sample -> judge -> optimise rounds.")
    split: str = Field(default="train", description="Split of the prompts dataset to sample from.")
    max_prompts: int | None = Field(default=None, ge=1, description="Prompts sampled per round at most.")
    n: int = Field(default=4, ge=2, description="Completions per prompt and round.")
    generation: SamplingSpec = Field(
        default_factory=SamplingSpec,
        description="Sampling settings of every round; engine: vllm starts the engine in each round's "
        "sample stage from that round's policy.",
    )
    judge: tuple[RewardSourceSpec, ...] = Field(
        min_length=1,
        description="Reward sources that score the samples (verifier, reward model, mix); they label "
        "the pairs unless judge_policy is given.",
    )
    judge_policy: PolicyJudgeSpec | None = Field(
        default=None, description="Or label pairs with a policy judging against written principles."
    )
    principles_per_comparison: int | None = Field(
        default=None,
        ge=1,
        description="With judge_policy: the judge sees this many of its principles per comparison, a seeded "
        "subset per pair (Constitutional AI's feedback step, book ch.12); null: every principle.",
    )
    pairing: Literal["best_vs_worst", "all_pairs"] = Field(
        default="best_vs_worst", description="One pair per prompt, or every pair of distinct completions."
    )
    min_margin: float = Field(default=0.0, ge=0, description="Drop pairs whose judge margin is smaller.")
    loss: str = Field(default="dpo", description=f"One of: {', '.join(PREFERENCE_LOSSES)} (not kto).")
    beta: float | None = Field(default=None, gt=0, description="beta of the loss; default: the loss's own.")
    loss_options: dict[str, float] = Field(
        default_factory=dict, description="Other hyperparameters of the loss by name (see direct_alignment)."
    )
    reference: Literal["previous", "initial"] = Field(
        default="previous",
        description="Reference model of each round: the previous round's policy, or the initial policy.",
    )
    train: PreferenceTrainSpec = Field(default_factory=PreferenceTrainSpec, description="Training settings.")
    monitor: MonitorSpec | None = Field(
        default=None,
        description=(
            "Over-optimization monitor of every round (its prompts default to `prompts`, split eval); "
            "each round's KL is to that round's reference."
        ),
    )

    _loss_takes_beta = field_validator("beta")(check_beta_of_loss)
    _loss_takes_options = field_validator("loss_options")(check_options_of_loss)

    @model_validator(mode="after")
    def _paired_loss(self) -> IterativeDPOTemplate:
        check_monitor_proxy(self.monitor, "iterative_dpo")
        k = self.principles_per_comparison
        if k is not None and self.judge_policy is None:
            raise ValueError("principles_per_comparison needs judge_policy (a judge with principles)")
        if k is not None and k > len(self.judge_policy.principles):  # type: ignore[union-attr]
            raise ValueError(
                f"principles_per_comparison is {k} but judge_policy.principles has "
                f"{len(self.judge_policy.principles)} principle(s)"  # type: ignore[union-attr]
            )
        if self.loss not in PREFERENCE_LOSSES or not PREFERENCE_LOSSES[self.loss].paired:
            paired = [name for name, loss in PREFERENCE_LOSSES.items() if loss.paired]
            raise ValueError(f"loss '{self.loss}' is not a pairwise loss (one of: {', '.join(paired)})")
        return self

    def expand(self, name: str, pipeline_seed: int) -> dict[str, dict[str, Any]]:
        """The rounds as ordinary stages (raw spec dicts), in order."""
        seed = self.seed if self.seed is not None else pipeline_seed
        needs_reference = PREFERENCE_LOSSES[self.loss].needs_reference
        stages: dict[str, dict[str, Any]] = {}
        policy = self.policy
        for r in range(1, self.rounds + 1):
            samples, pairs = f"{name}-r{r}-samples", f"{name}-r{r}-pairs"
            model = name if r == self.rounds else f"{name}-r{r}"
            stages[samples] = {
                "kind": "sample", "policy": policy, "prompts": self.prompts, "split": self.split,
                "n": self.n, "max_prompts": self.max_prompts, "seed": seed + r - 1,
                "generation": self.generation.model_dump(exclude_unset=True), "rewards": _dump(self.judge),
            }  # fmt: skip
            stages[pairs] = {
                "kind": "label_preferences", "completions": samples, "pairing": self.pairing,
                "min_margin": self.min_margin, "seed": seed,
                **({"judge_policy": self.judge_policy.model_dump(),
                    "principles_per_comparison": self.principles_per_comparison} if self.judge_policy
                   else {"judge": _dump(self.judge)}),
            }  # fmt: skip
            stages[model] = {
                "kind": "direct_alignment", "policy": policy, "data": f"{pairs}.preferences",
                "loss": self.loss, "beta": self.beta, "loss_options": dict(self.loss_options),
                "train": self.train.model_dump(exclude_unset=True), "seed": seed,
                **({"reference": self.policy} if needs_reference and self.reference == "initial" else {}),
                **({"monitor": self._round_monitor()} if self.monitor is not None else {}),
            }  # fmt: skip
            policy = model
        return stages

    def _round_monitor(self) -> dict[str, Any]:
        """The monitor block of each round: the template's, with its prompts defaulting to ``prompts``."""
        monitor = self.monitor.model_dump(exclude_none=True)
        monitor["prompts"] = self.monitor.prompts or self.prompts
        monitor["proxy"], monitor["gold"] = _dump(self.monitor.proxy), _dump(self.monitor.gold)
        return monitor


def _dump(sources: tuple[RewardSourceSpec, ...]) -> list[dict[str, Any]]:
    return [source.model_dump(exclude_none=True) for source in sources]
