"""The ``policy_gradient`` stage: on-policy RL from rewards (book ch.6, ch.7 and ch.15).

One kind; ``algorithm:`` chooses the advantage estimator, the policy loss and their defaults (the
book's comparison table):

| algorithm | advantage | loss | KL (when beta > 0) | aggregation | clip low/high |
|---|---|---|---|---|---|
| reinforce | reward - batch mean | -A log pi | in the reward | sequence | - |
| rloo | leave-one-out (group) | -A log pi | in the reward | sequence | - |
| ppo | GAE on a value model | clipped ratio, value loss | per token in the reward | sequence | 0.2 / 0.2 |
| grpo | (r - mean) / (std + 1e-4) per group | clipped ratio | in the loss (k3) | sequence | 0.2 / 0.2 |
| dr_grpo | r - group mean | clipped ratio | in the loss (k3) | fixed_length | 0.2 / 0.2 |
| dapo | as grpo, all-equal groups dropped (refilled) | clipped ratio | none by default | token | 0.2 / 0.28 |
| gspo | as grpo | sequence-level ratio, clipped | in the loss (k3) | sequence | 0.2 / 0.2 |
| cispo | as grpo | clipped stop-gradient weight | in the loss (k3) | token | 0.2 / 0.4 |

dapo also applies the soft overlong penalty. Defaults follow the book's companion code where the
reference gives them (eps 0.2, DAPO clip-higher 0.28, CISPO 0.4, PPO gamma 1, lambda 0.95, vf_coef 0.5,
value clip 0.2).

``distillation:`` adds on-policy distillation from a teacher (book ch.12, :mod:`rlhf_core.spec.distillation`):
a per-token advantage on top of the algorithm's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf_core.spec.async_rollouts import DEFAULT_ASYNC_TIS_CAP, AsyncRolloutsSpec
from rlhf_core.spec.base import StageSpec, Strict
from rlhf_core.spec.decoding import SamplingSpec
from rlhf_core.spec.distillation import DistillationSpec, distillation_problem
from rlhf_core.spec.environments import EnvironmentSpec
from rlhf_core.spec.monitor import MonitorSpec
from rlhf_core.spec.references import PolicyModel, PromptsData, RefType, RewardModel, model_output
from rlhf_core.spec.reward_sources import RewardSourceSpec
from rlhf_core.spec.training import LoraSpec, OptimSpec

Algorithm = Literal["reinforce", "rloo", "ppo", "grpo", "dr_grpo", "dapo", "gspo", "cispo"]
GROUP_ALGORITHMS = ("rloo", "grpo", "dr_grpo", "dapo", "gspo", "cispo")


@dataclass(frozen=True)
class AlgorithmDefaults:
    """What ``algorithm:`` sets unless the stage overrides it."""

    estimator: Literal["batch_mean", "rloo", "gae", "grpo", "dr_grpo"]
    loss: Literal["reinforce", "clipped", "gspo", "cispo"]
    kl_placement: Literal["reward", "loss"]
    aggregation: Literal["sequence", "token", "fixed_length"]
    clip: tuple[float, float] = (0.2, 0.2)
    beta: float = 0.05
    group_size: int = 8


ALGORITHMS: dict[str, AlgorithmDefaults] = {
    "reinforce": AlgorithmDefaults(
        estimator="batch_mean", loss="reinforce", kl_placement="reward", aggregation="sequence", group_size=1
    ),
    "rloo": AlgorithmDefaults(
        estimator="rloo", loss="reinforce", kl_placement="reward", aggregation="sequence"
    ),
    "ppo": AlgorithmDefaults(
        estimator="gae", loss="clipped", kl_placement="reward", aggregation="sequence", group_size=1
    ),
    "grpo": AlgorithmDefaults(estimator="grpo", loss="clipped", kl_placement="loss", aggregation="sequence"),
    "dr_grpo": AlgorithmDefaults(
        estimator="dr_grpo", loss="clipped", kl_placement="loss", aggregation="fixed_length"
    ),
    "dapo": AlgorithmDefaults(
        estimator="grpo", loss="clipped", kl_placement="loss", aggregation="token", clip=(0.2, 0.28), beta=0.0
    ),
    "gspo": AlgorithmDefaults(estimator="grpo", loss="gspo", kl_placement="loss", aggregation="sequence"),
    "cispo": AlgorithmDefaults(
        estimator="grpo", loss="cispo", kl_placement="loss", aggregation="token", clip=(0.2, 0.4)
    ),
}


class KLSpec(Strict):
    """KL(pi || pi_ref) regularization (book ch.15). beta 0 loads no reference model at all."""

    beta: float | None = Field(
        default=None, ge=0, description="Initial KL coefficient; default 0.05 (0 for dapo). 0: no KL term."
    )
    estimator: Literal["k1", "k2", "k3"] | None = Field(
        default=None,
        description="Per-token estimator: k1 (log ratio), k2, k3; default k1 in the reward, k3 in the loss.",
    )
    placement: Literal["reward", "loss"] | None = Field(
        default=None,
        description=(
            "Subtract beta * KL from the reward (ppo per token; reinforce/rloo per completion) or add it "
            "to the loss (grpo family); default: the algorithm's."
        ),
    )
    reduce: Literal["mean", "sum"] = Field(
        default="mean",
        description="How a completion's per-token KL becomes one number when folded into its reward.",
    )
    target: float | None = Field(
        default=None, gt=0, description="Adaptive controller (Ziegler 2019): KL per completion to aim at."
    )
    horizon: int = Field(default=10_000, ge=1, description="Adaptive controller horizon, in completions.")


class PPOSpec(Strict):
    """PPO's value model and GAE (used only by algorithm ppo)."""

    gamma: float = Field(default=1.0, ge=0, le=1, description="Discount (1 for whole completions).")
    lam: float = Field(default=0.95, ge=0, le=1, description="GAE lambda (book: 0.95; companion 0.98).")
    vf_coef: float = Field(default=0.5, ge=0, description="Weight of the value loss in the total loss.")
    value_lr: float | None = Field(
        default=None, gt=0, description="Peak learning rate of the value model; default: train.lr."
    )
    value_clip: float | None = Field(default=0.2, gt=0, description="Value clipping epsilon (None: off).")
    whiten_advantages: bool = Field(default=True, description="(A - mean) / (std + 1e-8) per rollout.")
    value_model: RewardModel | None = Field(
        default=None,
        description=(
            "Initialise the value model from this reward model (InstructGPT); default: from the policy's "
            "backbone with a zero value head."
        ),
    )


class RLTrainSpec(OptimSpec):
    """Optimiser settings; one optimizer step per mini-batch of a rollout (the stage's ``rollouts``,
    ``update_epochs`` and ``minibatches`` set how many; ``max_steps`` caps them; ``epochs`` and
    ``grad_accum`` do not apply)."""

    lr: float = Field(default=1e-5, gt=0, description="Peak learning rate (book: 1e-6 to 5e-6 at scale).")
    batch_size: int = Field(
        default=16, ge=1, description="Completions per micro-batch of an update (memory, not the math)."
    )
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="Fraction of steps of linear warmup.")
    schedule: Literal["linear", "cosine", "constant"] = Field(default="constant", description="LR schedule.")
    log_every: int = Field(default=1, ge=1, description="Report metrics every N optimizer steps.")

    @model_validator(mode="after")
    def _no_offline_step_counts(self) -> RLTrainSpec:
        # a value other than the default: the defaults themselves come back when a stage's JSON is read
        # again (a rank's job, a work pool's call), and mean nothing here either
        fields = type(self).model_fields
        given = sorted(
            name for name in ("epochs", "grad_accum") if getattr(self, name) != fields[name].default
        )
        if given:
            raise ValueError(
                f"{', '.join(given)}: not used by on-policy RL; set the stage's rollouts, update_epochs and "
                "minibatches instead"
            )
        return self


class PolicyGradientStage(StageSpec):
    """On-policy RL: sample from the current policy, score with the reward sources, update (book ch.6)."""

    kind: Literal["policy_gradient"]
    algorithm: Algorithm = Field(description=f"One of: {', '.join(ALGORITHMS)}.")
    policy: PolicyModel = Field(description="Policy to optimise (usually the SFT model).")
    prompts: PromptsData = Field(description="Prompts dataset reference, e.g. data.prompts.")
    split: str = Field(default="train", description="Split of the prompts dataset to train on.")
    rewards: tuple[RewardSourceSpec, ...] = Field(
        default=(),
        description="Reward sources scored at the end of each completion (of an episode: its final answer); "
        "summed with weights. Needed unless an environment gives rewards or distillation is given.",
    )
    environment: EnvironmentSpec | None = Field(
        default=None,
        description="Train on multi-turn episodes with this environment (tools, verifier feedback, a "
        "simulated user, your own class): only the model's own tokens carry loss, KL and advantages.",
    )
    reference: PolicyModel | None = Field(
        default=None, description="Reference for the KL term; default: the policy's starting weights."
    )
    distillation: DistillationSpec | None = Field(
        default=None,
        description="On-policy distillation (book ch.12), e.g. {teacher: big_sft}: each of the policy's "
        "tokens gets coef * (log pi_teacher - log pi_old) added to its advantage (a teacher model in memory "
        "beside the policy). Without rewards the advantage is this term alone (and a truncated completion "
        "is not penalised: there is no reward for `truncated` to replace).",
    )
    rollouts: int = Field(default=50, ge=1, description="Rollouts (sample -> score -> update) to run.")
    prompts_per_rollout: int = Field(default=4, ge=1, description="Prompts sampled per rollout.")
    group_size: int | None = Field(
        default=None,
        ge=1,
        description="Completions per prompt (G); default 8 for group algorithms, 1 for reinforce and ppo.",
    )
    update_epochs: int = Field(default=1, ge=1, description="Passes over each rollout (PPO: 1-4).")
    minibatches: int = Field(default=1, ge=1, description="Optimizer steps per pass over a rollout.")
    clip_low: float | None = Field(default=None, gt=0, lt=1, description="Ratio clip 1 - eps_low.")
    clip_high: float | None = Field(default=None, gt=0, description="Ratio clip 1 + eps_high (DAPO: 0.28).")
    aggregation: Literal["sequence", "token", "fixed_length"] | None = Field(
        default=None,
        description="Loss aggregation (book ch.6): per-sequence mean, per-token mean, or / max_new_tokens.",
    )
    kl: KLSpec = Field(default_factory=KLSpec, description="KL regularization to the reference.")
    ppo: PPOSpec = Field(default_factory=PPOSpec, description="PPO's value model and GAE.")
    dynamic_sampling: bool | None = Field(
        default=None,
        description="Drop groups whose rewards are all equal and refill the rollout (default: on for dapo).",
    )
    max_sampling_rounds: int = Field(
        default=4, ge=1, description="Dynamic sampling: at most this many sampling rounds per rollout."
    )
    overlong_cache: int | None = Field(
        default=None,
        ge=1,
        description=(
            "DAPO's soft overlong penalty: the last N tokens before max_new_tokens cost up to -1 "
            "(default: a quarter of max_new_tokens for dapo, off otherwise)."
        ),
    )
    tis_cap: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Truncated importance sampling (book ch.6): weight each token's loss by min(pi_train / "
            "pi_engine, C) to correct the engine/trainer mismatch; C here (2 in Open Instruct). Needs "
            "generation.engine: vllm or async_rollouts (whose default is 2). The mismatch itself is logged "
            "whenever the engine is vllm."
        ),
    )
    async_rollouts: AsyncRolloutsSpec | None = Field(
        default=None,
        description="Generate the next rollouts while training on the current one (e.g. {max_staleness: "
        "1}); with engine native they are decoded by a copy of the policy in a background process.",
    )
    truncated: Literal["penalty", "zero", "score"] = Field(
        default="penalty",
        description=(
            "A completion that reaches max_new_tokens without EOS: reward `truncated_reward`, reward 0, or "
            "score it anyway (reward models see an unfinished answer: out of distribution)."
        ),
    )
    truncated_reward: float = Field(default=-1.0, description="The reward of a truncated completion.")
    generation: SamplingSpec = Field(default_factory=SamplingSpec, description="Rollout decoding.")
    train: RLTrainSpec = Field(default_factory=RLTrainSpec, description="Optimiser settings.")
    lora: LoraSpec | None = Field(default=None, description="Train LoRA adapters instead of all weights.")
    sample_table_every: int = Field(
        default=10, ge=1, description="Log a table of sampled completions every N rollouts."
    )
    monitor: MonitorSpec | None = Field(
        default=None,
        description=(
            "Over-optimization monitor: proxy (default: `rewards`) and gold reward of the policy's answers "
            "vs KL on held-out prompts (default: the eval split of `prompts`)."
        ),
    )
    register_as: str | None = Field(
        default=None, description="Registered model name; default '<pipeline>-<stage>'."
    )

    outputs: ClassVar[dict[str, RefType]] = {"model": model_output("policy")}
    trains_in_processes: ClassVar[bool] = True

    @property
    def asynchronous(self) -> bool:
        """Whether rollouts are generated ahead (async_rollouts with max_staleness > 0)."""
        return self.async_rollouts is not None and self.async_rollouts.max_staleness > 0

    @property
    def effective_tis_cap(self) -> float | None:
        """The truncated importance weight's cap C that applies: the stage's, else 2 when asynchronous."""
        if self.tis_cap is None and self.asynchronous:
            return DEFAULT_ASYNC_TIS_CAP
        return self.tis_cap

    def shared_tokenizer_refs(self) -> dict[str, tuple[str, str]]:
        return (
            {}
            if self.distillation is None
            else {"distillation.teacher": (self.policy, self.distillation.teacher)}
        )

    def processes_problem(self) -> str | None:
        if self.compute is not None and self.compute.processes > 1:
            if self.generation.engine == "vllm" and self.generation.vllm.placement != "colocated":
                return (
                    "with several processes each rank starts its own vLLM engine beside it "
                    "(generation.vllm.placement: colocated); a server placement is one engine for one "
                    "process: set it to 1, or use placement: colocated"
                )
            if self.monitor is not None:
                return "the over-optimization monitor runs in a single process; set it to 1"
        return super().processes_problem()

    @model_validator(mode="after")
    def _consistent(self) -> PolicyGradientStage:
        if self.rewardless and self.distillation is None:
            raise ValueError(
                "give at least one reward source in rewards (or an environment that rewards, or distillation)"
            )
        if self.distillation is not None and (problem := distillation_problem(self, ALGORITHMS)):
            raise ValueError(problem)
        if self.environment is not None and (self.asynchronous or self.monitor is not None):
            raise ValueError(
                "environment: multi-turn episodes run synchronously and without the over-optimization "
                "monitor (not built yet): remove async_rollouts / monitor"
            )
        if self.monitor is not None and {g.name for g in self.monitor.gold} == {
            p.name for p in self.monitor_proxy
        }:
            raise ValueError(
                "monitor.gold: it is the proxy (the stage's own rewards); give a verifier or a held-out "
                "reward model"
            )
        if self.algorithm in GROUP_ALGORITHMS and self.group_size is not None and self.group_size < 2:
            raise ValueError(
                f"algorithm '{self.algorithm}' compares the completions of a prompt: group_size must be >= 2 "
                "(or use reinforce / ppo)"
            )
        if self.algorithm == "ppo" and self.kl.placement == "loss":
            raise ValueError("ppo puts the KL penalty in the per-token reward: remove kl.placement: loss")
        if self.generation.engine == "transformers":
            raise ValueError(
                "generation.engine: rollouts need the sampled token ids the update trains on, which "
                "engine transformers does not return; use native or vllm"
            )
        if self.tis_cap is not None and self.generation.engine != "vllm" and not self.asynchronous:
            raise ValueError(
                "tis_cap corrects the mismatch between a separate rollout engine and the trainer; with "
                f"generation.engine: {self.generation.engine} there is none: set engine: vllm or "
                "async_rollouts, or drop tis_cap"
            )
        if self.overlong_cache is not None and self.overlong_cache > self.generation.max_new_tokens:
            raise ValueError("overlong_cache must not exceed generation.max_new_tokens")
        if self.completions_per_rollout % self.minibatches:
            raise ValueError(
                f"{self.completions_per_rollout} completions per rollout (prompts_per_rollout x group_size) "
                f"do not split into {self.minibatches} minibatches"
            )
        return self

    @property
    def defaults(self) -> AlgorithmDefaults:
        return ALGORITHMS[self.algorithm]

    @property
    def completions_per_rollout(self) -> int:
        return self.prompts_per_rollout * self.effective_group_size

    @property
    def effective_group_size(self) -> int:
        return self.group_size if self.group_size is not None else self.defaults.group_size

    @property
    def beta(self) -> float:
        return self.kl.beta if self.kl.beta is not None else self.defaults.beta

    @property
    def rewardless(self) -> bool:
        """No reward sources and no environment: the advantage comes from distillation alone."""
        return not self.rewards and self.environment is None

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    def resolved(self) -> PolicyGradientStage:
        """This stage with the algorithm's defaults filled in (the book's table above; ``rlhf_core.spec``)."""
        d, kl = self.defaults, self.kl
        unclipped = d.loss == "reinforce"
        placement = kl.placement or d.kl_placement
        filled_kl = kl.model_copy(
            update={
                "beta": self.beta,
                "placement": placement,
                "estimator": kl.estimator or ("k1" if placement == "reward" else "k3"),
            }
        )
        overlong = self.overlong_cache
        if overlong is None and self.algorithm == "dapo":  # DAPO's soft penalty: a quarter of the budget
            overlong = max(1, self.generation.max_new_tokens // 4)
        return self.model_copy(
            update={
                "group_size": self.effective_group_size,
                # reinforce and rloo clip nothing: no clip range to show
                "clip_low": self.clip_low if self.clip_low is not None or unclipped else d.clip[0],
                "clip_high": self.clip_high if self.clip_high is not None or unclipped else d.clip[1],
                "aggregation": self.aggregation or d.aggregation,
                "kl": filled_kl,
                "dynamic_sampling": (
                    self.dynamic_sampling if self.dynamic_sampling is not None else self.algorithm == "dapo"
                ),
                "overlong_cache": overlong,
            }
        )

    @property
    def monitor_proxy(self) -> tuple[RewardSourceSpec, ...]:
        """The monitor's proxy reward: its own ``proxy``, else the stage's ``rewards``."""
        return (self.monitor.proxy if self.monitor is not None else ()) or self.rewards
