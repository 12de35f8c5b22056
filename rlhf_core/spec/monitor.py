"""The ``monitor:`` block of the policy-optimization stages: the over-optimization (Goodhart) monitor.

Shared by ``policy_gradient``, ``direct_alignment`` and ``iterative_dpo`` (which hands it to each
round). Every ``every`` optimizer steps (and before the first and after the last) the current policy
answers a fixed set of held-out prompts; the answers are scored by the *proxy* (the reward being
optimized) and by a *gold* signal (a verifier, or a second, held-out reward model), and the KL to the
reference is estimated from the policy's samples. Over-optimization (book ch.14) shows as proxy rising
while gold falls as the KL grows; ``early_stop`` ends training when that happens ``patience``
evaluations in a row and registers the evaluated weights with the best gold.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_core.spec.base import Strict
from rlhf_core.spec.references import PromptsData
from rlhf_core.spec.reward_sources import RewardSourceSpec

DEFAULT_MONITOR_SPLIT = "eval"


class MonitorGenerationSpec(Strict):
    """How the policy answers the monitor's prompts (the KL estimate always samples at temperature 1).

    The decoder is fixed for the whole run, so every evaluation is comparable with the others: by
    default the monitor follows the stage, decoding through the stage's rollout engine when it keeps
    one open (``policy_gradient`` with ``generation.engine: vllm``; the engine is handed the policy's
    weights of the evaluated step first) and with the native loop otherwise (``direct_alignment``, and
    ``iterative_dpo``'s rounds, train without an engine). ``engine: native`` keeps the native loop even
    then, e.g. to compare the monitors of runs whose rollouts used different engines."""

    max_new_tokens: int = Field(default=32, ge=1, description="Tokens generated per answer at most.")
    temperature: float = Field(default=0.0, ge=0, description="0: greedy answers (the default).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass (temperature > 0).")
    batch_size: int = Field(default=64, ge=1, description="Sequences decoded together.")
    engine: Literal["stage", "native"] = Field(
        default="stage",
        description=(
            "'stage': the stage's open rollout engine where it has one (policy_gradient with "
            "generation.engine: vllm), else the native loop; 'native': always the native loop."
        ),
    )


class EarlyStopSpec(Strict):
    """Stop when gold fell ``patience`` evaluations in a row while proxy rose over the same span."""

    patience: int = Field(
        default=3, ge=1, description="Consecutive evaluations with a strictly lower gold than the one before."
    )


class MonitorSpec(Strict):
    """Proxy and gold reward of the policy's answers on fixed held-out prompts, against KL to the
    reference, every ``every`` optimizer steps; optionally stop early (book ch.14)."""

    every: int = Field(
        default=20, ge=1, description="Evaluate every N optimizer steps, before the first and after the last."
    )
    prompts: PromptsData | None = Field(
        default=None,
        description=(
            "Held-out prompts (a prompts dataset, e.g. data.prompts); default: the stage's own prompts "
            "(policy_gradient: `prompts`; direct_alignment: the prompts of its preference data; "
            "iterative_dpo: `prompts`)."
        ),
    )
    split: str = Field(
        default=DEFAULT_MONITOR_SPLIT,
        description="Split of those prompts to use (default eval: prompts the policy never trains on).",
    )
    max_prompts: int = Field(default=64, ge=1, description="The first N prompts of the split at most.")
    proxy: tuple[RewardSourceSpec, ...] = Field(
        default=(),
        description=(
            "The proxy reward (weighted sum of the sources); default for policy_gradient: the stage's "
            "`rewards`. Direct-alignment stages have no reward of their own and must name one."
        ),
    )
    gold: tuple[RewardSourceSpec, ...] = Field(
        min_length=1,
        description="The gold signal: a verifier, or a reward model held out from training.",
    )
    generation: MonitorGenerationSpec = Field(
        default_factory=MonitorGenerationSpec, description="How the policy answers the prompts."
    )
    kl_samples: int = Field(
        default=1,
        ge=1,
        description=(
            "Completions per prompt sampled at temperature 1 for KL(pi || pi_ref) (k1 summed over each "
            "completion's tokens, averaged)."
        ),
    )
    early_stop: EarlyStopSpec | None = Field(
        default=None,
        description=(
            "Stop when gold falls `patience` evaluations in a row while proxy rises over the same span; "
            "with early_stop the stage registers the evaluated weights with the best gold. None: only log."
        ),
    )

    @model_validator(mode="after")
    def _gold_is_not_the_proxy(self) -> MonitorSpec:
        if self.proxy and {s.name for s in self.gold} == {s.name for s in self.proxy}:
            raise ValueError("gold is the proxy itself: give a verifier or a held-out reward model")
        return self


def check_monitor_proxy(monitor: MonitorSpec | None, kind: str) -> None:
    """Stages without a reward of their own must name the monitor's proxy."""
    if monitor is not None and not monitor.proxy:
        raise ValueError(
            f"monitor.proxy: a {kind} stage optimizes no reward of its own; name the proxy reward "
            "sources, e.g. proxy: [{model: rm}]"
        )
