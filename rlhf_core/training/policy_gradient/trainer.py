"""On-policy RL (book ch.6): rollouts from the current policy, advantages, clipped/weighted policy-gradient
updates; REINFORCE, RLOO, PPO, GRPO, Dr. GRPO, DAPO, GSPO and CISPO from one loop.

Optimizer steps are numbered globally; step s belongs to rollout r = s // U with U = update_epochs x
minibatches updates per rollout. The first update of a rollout collects it (:mod:`.rollouts`): sample G
completions per prompt, reward them at their end, record pi_old / pi_ref log-probs and PPO values per
token, then compute advantages:

- reinforce / rloo / grpo family: one scalar reward per completion (minus beta x the completion's KL when
  the KL goes in the reward), turned into advantages by the batch-mean baseline, leave-one-out, or the
  group normalization (:mod:`rlhf_core.losses.advantages`), broadcast to every token;
- ppo: per-token rewards (-beta x KL_t on every token, the score on the last), GAE on the value model,
  whitened;
- with ``distillation`` (book ch.12), a teacher scores the rollout's tokens too and coef x (log pi_T -
  log pi_old) is added per token to the estimator's advantages (:mod:`.distillation`).

Each update takes a shuffled mini-batch of the rollout's completions, recomputes log pi with gradient
and applies the algorithm's loss (:mod:`rlhf_core.losses.policy_gradient`), plus beta x KL (k3) when the
KL goes in the loss, plus PPO's value loss, aggregated as configured (:mod:`rlhf_core.losses.masking`).
A rollout's metrics (``rollout/...``: reward, KL, lengths, times) are logged with the step after its
collection when the loop logs one of its updates (every ``train.log_every`` steps, and the last).
The rollout buffer, the KL controller and the prompt cursor are checkpointed with the weights and the
optimizer, so a killed run resumes exactly (the samples of a rollout are drawn from generators seeded by
the seed, the sampling round and the chunk).

Where the completions come from (:mod:`.rollout_sampling`): sampled when the rollout starts, by the
policy's current weights (synchronous), or generated ahead by a background producer at most
``async_rollouts.max_staleness`` versions behind (asynchronous; each token's loss is then weighted by
min(pi_old / pi_behaviour, C), book ch.6). With ``compute.processes`` > 1 the ranks share each rollout's
sampling and scoring and every rank holds the whole gathered rollout (:mod:`.rank_sharing`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.errors import NonFiniteLossError, UserError
from rlhf_core.losses.importance_correction import mismatch_metrics, truncated_importance_weights
from rlhf_core.losses.kl import kl_per_token
from rlhf_core.losses.masking import aggregate_loss, masked_mean
from rlhf_core.losses.policy_gradient import clipped_value_loss
from rlhf_core.modeling.completion_scoring import (
    can_share_prefix,
    pack_completions,
    policy_token_logprobs,
    to_grid,
    value_token_values,
)
from rlhf_core.rollout.engines.base import RolloutEngine
from rlhf_core.rollout.episode_sampling import transcript
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.training.engine.data_parallel import rank_and_world
from rlhf_core.training.engine.loop import (
    TOKENS,
    LogFn,
    StepContext,
    UnshardedCopy,
    launched_sharded,
    run_optimizer_steps,
)
from rlhf_core.training.engine.lora import apply_lora
from rlhf_core.training.engine.result import TrainingResult
from rlhf_core.training.monitor.overoptimization import (
    MonitorInputs,
    MonitorStop,
    OverOptimizationMonitor,
    starting_reference,
)
from rlhf_core.training.policy_gradient.algorithms import (
    Settings,
    compute_advantages,
    kl_controller,
    needs_value_model,
    policy_loss,
    rollout_metrics,
)
from rlhf_core.training.policy_gradient.distillation import Distiller
from rlhf_core.training.policy_gradient.rank_sharing import gather_objects, score_across_ranks
from rlhf_core.training.policy_gradient.rollout_pipeline_metrics import IdleClock, staleness_metrics
from rlhf_core.training.policy_gradient.rollout_sampling import (
    AsynchronousRounds,
    RoundSource,
    SynchronousRounds,
    sample_rollout,
)
from rlhf_core.training.policy_gradient.rollouts import (
    PromptStream,
    RewardFn,
    Rollout,
    RolloutBuffer,
)

SampleLogFn = Callable[[list[dict], int], None]
HEADLINE_ROLLOUT = ("reward_mean", "kl", "distill/reverse_kl", "completion_length", "truncated_share")


@dataclass(kw_only=True)
class PolicyGradientResult(TrainingResult):
    rollouts: int  # rollouts the run's steps belong to
    last_metrics: dict[str, float] = field(default_factory=dict)  # the last optimizer step's
    last_rollout_metrics: dict[str, float] = field(default_factory=dict)  # the last rollout's
    monitor: dict | None = None  # the over-optimization monitor's summary, when it ran

    def summary(self) -> dict[str, float]:
        """The run's headline numbers: reward, KL and lengths of the last rollout (the optimizer step's
        metrics hold none of them but the loss's KL), and the work done."""
        last = {**self.last_metrics, **self.last_rollout_metrics}
        shown = {k: float(last[k]) for k in HEADLINE_ROLLOUT if k in last}
        shown |= {"rollouts": float(self.rollouts), "steps": float(self.steps)}
        if self.resumed_from_step:
            shown["resumed_from_step"] = float(self.resumed_from_step)
        return shown


class PolicyGradientTrainer:
    """Everything one optimizer step needs; ``step_fn`` is handed to the shared loop."""

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        records: list[dict],
        stage: PolicyGradientStage,
        reward_fn: RewardFn,
        *,
        seed: int,
        stage_name: str,
        reference: Callable[[], contextlib.AbstractContextManager] | None,
        value_model: PreTrainedModel | None,
        log: LogFn | None,
        log_samples: SampleLogFn | None,
        engine: RolloutEngine | None = None,
        unsharded: UnshardedCopy | None = None,
        teacher: PreTrainedModel | None = None,
    ) -> None:
        self.policy, self.tokenizer, self.records, self.stage = policy, tokenizer, records, stage
        # sharded (FSDP2) training: rollouts decode and score with a whole copy refreshed from the shards
        self.unsharded = unsharded
        self.rollout_policy, self.rollout_value = policy, value_model
        # None: the native loop decodes with the policy itself; asynchronous: the producer owns the engine
        self.engine = None if stage.asynchronous else engine
        self.engine_weights_step: int | None = None  # the optimizer step whose weights the engine holds
        self.reward_fn, self.seed, self.stage_name = self._timed(reward_fn), seed, stage_name
        self.reward_seconds = 0.0  # of the rollout being collected
        self.reference, self.value_model = reference, value_model
        self.distiller = None  # on-policy distillation (book ch.12): the teacher and its weight
        if stage.distillation is not None:
            if teacher is None:
                raise ValueError("distillation: give the teacher model")
            coef, batch_size = stage.distillation.coef, stage.train.batch_size
            self.distiller = Distiller(teacher, coef, tokenizer.pad_token_id, batch_size)
        self.main_process = rank_and_world()[0] == 0  # with several processes, the main one logs
        self.log_samples = log_samples if self.main_process else None
        self.log = log if log is not None and self.main_process else (lambda metrics, step: None)
        self.last_rollout_metrics: dict[str, float] = {}
        self.settings = Settings.of(stage)
        self.prompts = PromptStream(len(records), seed)
        self.buffer = RolloutBuffer()
        self.controller = kl_controller(stage)
        self.shared_prefix = can_share_prefix(policy, value_model)
        self.tis_cap = stage.effective_tis_cap
        self.rounds: RoundSource = SynchronousRounds(
            policy, tokenizer, records, stage, self.reward_fn, seed, engine=engine, stage_name=stage_name
        )
        if stage.asynchronous:
            if engine is None:
                raise ValueError("asynchronous rollouts need a rollout engine to generate in the background")
            self.rounds = AsynchronousRounds(
                engine, tokenizer, records, self.prompts, stage, self.reward_fn, seed, stage_name
            )
        self.generation_s = 0.0  # synchronous rollouts: seconds spent generating (the trainer waiting)
        self.cycle = IdleClock()

    @property
    def extra_state(self) -> list:
        return [self.prompts, self.buffer, self.controller]

    @property
    def total_steps(self) -> int:
        """``rollouts`` x updates per rollout, or ``train.max_steps`` when that is fewer."""
        total = self.stage.rollouts * self.settings.updates_per_rollout
        return min(total, self.stage.train.max_steps) if self.stage.train.max_steps is not None else total

    def logs_rollout(self, index: int) -> bool:
        """Whether rollout ``index``'s metrics are logged: when the loop logs one of its updates (every
        ``train.log_every`` steps, and the last), so the stage's log follows ``log_every`` as every
        kind's does."""
        updates, total = self.settings.updates_per_rollout, self.total_steps
        done = range(index * updates + 1, min((index + 1) * updates, total) + 1)
        return any(d % self.stage.train.log_every == 0 or d == total for d in done)

    def _timed(self, reward_fn: RewardFn) -> RewardFn:
        """``reward_fn`` adding its wall time to ``reward_seconds`` (logged as ``time/reward_s``)."""

        def timed(rows: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
            started = time.perf_counter()
            try:
                return reward_fn(rows)
            finally:
                self.reward_seconds += time.perf_counter() - started

        return timed

    def collect(self, index: int, step: int, ctx: StepContext | None = None) -> None:
        """Rollout ``index``: sample (refilling dropped groups when dynamic sampling), score, advantages."""
        stage, settings = self.stage, self.settings
        self.cycle.start(*self.pipeline_clocks())
        if self.unsharded is not None and ctx is not None and ctx.sharded_root is not None:
            self.refresh_rollout_models(ctx.sharded_root)
        if isinstance(self.rounds, AsynchronousRounds):
            started = time.perf_counter()
            self.rounds.publish(index, self.rollout_policy)  # this rollout's weights, for the rounds ahead
            sync_seconds = time.perf_counter() - started
        else:
            sync_seconds = self.sync_engine(step)
        started, self.reward_seconds = time.perf_counter(), 0.0
        max_staleness = stage.async_rollouts.max_staleness if stage.async_rollouts is not None else None
        sampled_rollout = sample_rollout(
            self.rounds, self.prompts, stage, dynamic_sampling=settings.dynamic_sampling, index=index,
            stage_name=self.stage_name, max_staleness=max_staleness,
        )  # fmt: skip
        samples = sampled_rollout.samples
        sampled = time.perf_counter()
        if isinstance(self.rounds, SynchronousRounds):
            self.generation_s += sampled - started - self.reward_seconds + sync_seconds
        rollout = score_across_ranks(
            samples, self.rollout_policy, self.reference, self.rollout_value, self.tokenizer.pad_token_id,
            shared_prefix=self.shared_prefix, batch_size=stage.train.batch_size,
            need_old=settings.need_old_pass,
        )  # fmt: skip
        scored = time.perf_counter()
        beta = self.controller.beta
        advantages, returns, kl_metrics = compute_advantages(rollout, settings, stage, beta)
        distill_metrics: dict[str, float] = {}
        if self.distiller is not None:  # a per-token term after the estimator's advantages
            advantages, distill_metrics = self.distiller.add_to(advantages, rollout, self.rollout_policy)
        rollout.metrics = {
            **rollout_metrics(rollout, settings), **kl_metrics, **distill_metrics, "beta": beta,
            "time/sample_and_reward_s": sampled - started, "time/reward_s": self.reward_seconds,
            "time/scoring_s": scored - sampled,
            "sampling_rounds": float(sampled_rollout.rounds),
            "dropped_groups": float(sampled_rollout.dropped_groups),
        }  # fmt: skip
        if max_staleness is not None and samples.versions is not None:
            rollout.metrics |= staleness_metrics(
                samples.versions, index, max_staleness, sampled_rollout.dropped_stale
            )
        if rollout.engine_logps is not None:
            rollout.metrics["time/weight_sync_s"] = sync_seconds
            rollout.metrics |= engine_mismatch_metrics(rollout, self.tis_cap)  # {} until the update
        if self.engine is not None:
            self.engine.release_memory()  # the device is the trainer's until the next rollout
        if "kl" in kl_metrics:
            self.controller.update(kl_metrics["kl"], len(samples.lengths))
        self.buffer.index, self.buffer.rollout = index, rollout
        self.buffer.advantages, self.buffer.returns = advantages, returns
        self.last_rollout_metrics = rollout.metrics
        if self.logs_rollout(index):
            self.log({f"rollout/{k}": v for k, v in rollout.metrics.items()}, step + 1)
        if self.log_samples is not None and index % stage.sample_table_every == 0:
            self.log_samples(sample_rows(rollout, index), index)

    def refresh_rollout_models(self, root: torch.nn.Module) -> None:
        """Sharded training: the whole policy (and value model) gathered from the shards into the copy
        the rollout decodes and scores with."""
        models = self.unsharded.refresh(root)
        if self.value_model is not None:
            self.rollout_policy, self.rollout_value = models["policy"], models["value"]
        else:
            self.rollout_policy = models
        if isinstance(self.rounds, SynchronousRounds):
            self.rounds.policy = self.rollout_policy

    def pipeline_clocks(self) -> tuple[float, float]:
        """(seconds the trainer has waited for completions, seconds the engine has been busy), totals."""
        if isinstance(self.rounds, AsynchronousRounds):
            producer = self.rounds.producer
            return self.rounds.wait_s, producer.engine_busy_s if producer is not None else 0.0
        return self.generation_s, self.generation_s

    def end_cycle(self, index: int, step: int) -> None:
        """After rollout ``index``'s last update: its cycle's idle shares, added to its metrics."""
        shares = self.cycle.shares(*self.pipeline_clocks())
        self.buffer.rollout.metrics |= shares
        self.last_rollout_metrics = self.buffer.rollout.metrics
        if shares and self.logs_rollout(index):
            self.log({f"rollout/{k}": v for k, v in shares.items()}, step + 1)

    def close(self) -> None:
        """Stop what runs in the background (the asynchronous producer); the engine is the caller's."""
        if isinstance(self.rounds, AsynchronousRounds):
            self.rounds.close()

    def sync_engine(self, step: int) -> float:
        """Hand the rollout engine the policy's weights unless it holds this step's already; seconds."""
        if self.engine is None or self.engine_weights_step == step:
            return 0.0
        started = time.perf_counter()
        self.engine.sync_weights(self.rollout_policy)  # LoRA adapters merged
        self.engine_weights_step = step
        return time.perf_counter() - started

    def engine_at(self, step: int) -> RolloutEngine:
        """The rollout engine, holding the weights after ``step`` optimizer steps (the monitor's decoder)."""
        assert self.engine is not None
        self.sync_engine(step)
        return self.engine

    def minibatch(self, rollout_index: int, update: int) -> list[int]:
        n = len(self.buffer.rollout.samples.lengths)
        epoch, part = divmod(update, self.stage.minibatches)
        generator = torch.Generator().manual_seed(self.seed * 7_919 + rollout_index * 104_729 + epoch)
        order = torch.randperm(n, generator=generator).tolist()
        size = n // self.stage.minibatches
        return sorted(order[part * size : (part + 1) * size])

    def step_fn(self, step: int, ctx: StepContext) -> dict[str, float]:
        index, update = divmod(step, self.settings.updates_per_rollout)
        if self.buffer.index != index:
            self.collect(index, step, ctx)
        update_started = time.perf_counter()
        rollout = self.buffer.rollout
        ids = self.minibatch(index, update)
        lengths = rollout.samples.model_token_counts
        total_tokens = sum(lengths[i] for i in ids)
        totals: dict[str, float] = {TOKENS: 0.0}
        # the engine's mismatch to pi_old, when pi_old is this update's own forward pass (one update per
        # rollout: no separate pass at the rollout), measured per micro-batch: (metrics, tokens)
        mismatch: list[tuple[dict[str, float], int]] | None = None
        if rollout.engine_logps is not None and rollout.old_logps is None:
            mismatch = []
        size = self.stage.train.batch_size
        for part, counts in ctx.share([ids[start : start + size] for start in range(0, len(ids), size)]):
            loss, stats, real_tokens = ctx.forward(self.micro_batch_loss, rollout, part, ctx.device, mismatch)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"stage '{self.stage_name}': the {self.stage.algorithm} loss is {loss.item()} at step "
                    f"{step + 1} (rollout {index + 1}); training stops, the last checkpoint is kept and "
                    "nothing is registered (lower lr? check the rewards)"
                )
            token_share = sum(lengths[i] for i in part) / total_tokens
            weight = token_share if self.settings.aggregation == "token" else len(part) / len(ids)
            ctx.backward(loss * (weight if counts else 0.0))
            if not counts:  # a sharded rank's repeated pass (see StepContext.share)
                continue
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value * weight
            totals[TOKENS] += float(real_tokens)
        if self.main_process:  # the loop sums every rank's metrics: one rank's clock
            totals["time/update_s"] = time.perf_counter() - update_started
        if mismatch is not None:
            self.record_mismatch(rollout, index, step, [m for part in gather_objects(mismatch) for m in part])
        if update == self.settings.updates_per_rollout - 1 or step == self.total_steps - 1:
            self.end_cycle(index, step)
        return totals

    def record_mismatch(
        self, rollout: Rollout, index: int, step: int, parts: list[tuple[dict[str, float], int]]
    ) -> None:
        """The rollout's ``mismatch/...`` from its micro-batches (token-weighted means, the max of the
        maxima), added to its metrics and logged with them."""
        if not parts:
            return
        tokens = sum(n for _, n in parts)
        metrics = {
            key: max(m[key] for m, _ in parts)
            if key.startswith("max_")
            else sum(m[key] * n for m, n in parts) / tokens
            for key in parts[0][0]
        }
        shown = {f"mismatch/{k}": v for k, v in metrics.items()}
        rollout.metrics |= shown
        self.last_rollout_metrics = rollout.metrics
        if self.logs_rollout(index):
            self.log({f"rollout/{k}": v for k, v in shown.items()}, step + 1)

    def micro_batch_loss(
        self,
        rollout: Rollout,
        ids: list[int],
        device: torch.device,
        mismatch: list[tuple[dict[str, float], int]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float], int]:
        samples, settings, stage = rollout.samples, self.settings, self.stage
        packed = pack_completions(
            [samples.prompt_ids[i] for i in ids], [samples.completion_ids[i] for i in ids],
            [samples.groups[i] for i in ids], self.tokenizer.pad_token_id, self.shared_prefix,
        ).to(device)  # fmt: skip
        width = packed.width
        mask = samples.token_mask(ids, width, device)
        need_entropy = rollout.entropy is None
        flat_logps, flat_entropy = policy_token_logprobs(self.policy, packed, with_entropy=need_entropy)
        logps = to_grid(flat_logps.float(), packed)
        # with one update per rollout (and no KL at the rollout) this forward pass is pi_old
        old = logps.detach() if rollout.old_logps is None else rollout.old_logps[ids, :width].to(device)
        advantages = self.buffer.advantages[ids].to(device)
        if advantages.dim() == 2:
            advantages = advantages[:, :width]
        result = policy_loss(settings, logps, old, advantages, mask)
        per_token = result.per_token
        if rollout.engine_logps is not None:
            engine_logps = rollout.engine_logps[ids, :width].to(device)
            if mismatch is not None:
                mismatch.append((mismatch_metrics(old, engine_logps, mask, self.tis_cap), int(mask.sum())))
            if self.tis_cap is not None:  # pi_old / pi_engine (pi_behaviour), capped
                per_token = per_token * truncated_importance_weights(old, engine_logps, mask, self.tis_cap)
        beta = self.controller.beta
        kl_k1 = None
        if rollout.ref_logps is not None:
            ref = rollout.ref_logps[ids, :width].to(device)
            kl_k1 = kl_per_token(logps.detach(), ref, mask, "k1").sum(1).mean()
            if beta > 0 and settings.kl_placement == "loss":
                per_token = per_token + beta * kl_per_token(logps, ref, mask, settings.kl_estimator)
        loss = aggregate_loss(per_token, mask, settings.aggregation, stage.generation.max_new_tokens)
        log_ratio = result.log_ratio
        stats = {
            "policy_loss": float(loss.detach()),
            "clip_fraction": float(masked_mean(result.clipped.float(), mask)),
            "approx_kl": float(masked_mean(0.5 * log_ratio.square(), mask)),
            "ratio_mean": float(masked_mean(torch.exp(log_ratio), mask)),
        }
        if kl_k1 is not None:
            stats["kl"] = float(kl_k1)
        if flat_entropy is not None:
            stats["entropy"] = float(masked_mean(to_grid(flat_entropy, packed), mask))
        if self.value_model is not None:
            values = to_grid(value_token_values(self.value_model, packed), packed)
            old_values = rollout.values[ids, :width].to(device)
            returns = self.buffer.returns[ids, :width].to(device)
            value_loss = aggregate_loss(
                clipped_value_loss(values, old_values, returns, mask, stage.ppo.value_clip), mask, "sequence"
            )
            loss = loss + stage.ppo.vf_coef * value_loss
            stats["value_loss"] = float(value_loss.detach())
        stats["loss"] = float(loss.detach())
        real_tokens = sum(len(samples.prompt_ids[i]) + samples.lengths[i] for i in ids)
        return loss, stats, real_tokens


def engine_mismatch_metrics(rollout: Rollout, tis_cap: float | None) -> dict[str, float]:
    """``mismatch/...`` of a rollout the engine sampled, how far its log-probs are from pi_old's, when
    pi_old was computed at the rollout (several updates per rollout, or the KL at the rollout); else
    ``{}`` and the rollout's first update measures it on its own forward pass (``record_mismatch``)."""
    if rollout.engine_logps is None or rollout.old_logps is None:
        return {}
    width = rollout.old_logps.shape[1]
    engine = torch.nn.functional.pad(rollout.engine_logps, (0, width - rollout.engine_logps.shape[1]))
    metrics = mismatch_metrics(rollout.old_logps, engine, rollout.mask[:, :width], tis_cap)
    return {f"mismatch/{k}": v for k, v in metrics.items()}


def sample_rows(rollout: Rollout, index: int, limit: int = 16) -> list[dict]:
    """A few of the rollout's completions as table rows (logged as an MLflow table)."""
    s = rollout.samples
    return [
        {
            "rollout": index + 1,
            "prompt": str(s.prompts[i]),
            "completion": s.texts[i],
            "reward": float(s.rewards[i]),
            "tokens": s.lengths[i],
            "truncated": s.truncated[i],
            **({"transcript": transcript(s.episodes[i].messages)} if s.episodes else {}),
        }
        for i in range(min(limit, len(s.texts)))
    ]


def reference_provider(
    policy: PreTrainedModel, stage: PolicyGradientStage, loaded: PreTrainedModel | None
) -> Callable[[], contextlib.AbstractContextManager] | None:
    """How the rollout reads pi_ref: none at beta 0; a given reference model; the LoRA policy with its
    adapters disabled (no copy); or a frozen copy of the policy's starting weights."""
    if not stage.needs_reference:
        return None
    return starting_reference(policy, stage.lora is not None, loaded)


def train_policy_gradient(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    stage: PolicyGradientStage,
    reward_fn: RewardFn,
    *,
    seed: int,
    checkpoint_dir: Path,
    stage_name: str = "policy_gradient",
    reference_model: PreTrainedModel | None = None,
    value_model: PreTrainedModel | None = None,
    log: LogFn | None = None,
    log_samples: SampleLogFn | None = None,
    monitor_inputs: MonitorInputs | None = None,
    engine: RolloutEngine | None = None,
    teacher_model: PreTrainedModel | None = None,
) -> tuple[PreTrainedModel, PreTrainedModel | None, PolicyGradientResult]:
    """Run ``stage.rollouts`` rollouts of on-policy RL on ``policy``; returns (policy, value model, result).

    ``records`` are prompt rows (``prompt`` and whatever the reward functions read, e.g. ``answer``).
    ``value_model`` (PPO) is a one-output sequence classifier trained with the policy. ``engine``: an
    open rollout engine that samples the rollouts (given the policy's weights before each one). With
    ``monitor_inputs`` the over-optimization monitor evaluates the policy every ``monitor.every`` steps
    and may stop training (:mod:`rlhf_core.training.monitor.overoptimization`); ``result.monitor``
    says so. ``teacher_model`` is the teacher of ``stage.distillation`` (:mod:`.distillation`).
    """
    torch.manual_seed(seed)
    if needs_value_model(stage) and value_model is None:
        raise ValueError(f"{stage.algorithm} needs a value model")
    if stage.lora is not None:
        policy = apply_lora(policy, stage.lora)
    reference = reference_provider(policy, stage, reference_model)
    trained_modules: torch.nn.Module = policy
    if value_model is not None:
        trained_modules = torch.nn.ModuleDict({"policy": policy, "value": value_model})
    unsharded = None
    if launched_sharded():
        if stage.lora is not None:
            raise UserError(
                f"stage '{stage_name}': a LoRA policy trains data-parallel, not sharded: drop the FSDP "
                "accelerate_config from its compute block (LoRA's optimizer state is small anyway)"
            )
        unsharded = UnshardedCopy(trained_modules)
    trainer = PolicyGradientTrainer(
        policy, tokenizer, records, stage, reward_fn, seed=seed, stage_name=stage_name,
        reference=reference, value_model=value_model, log=log, log_samples=log_samples, engine=engine,
        unsharded=unsharded, teacher=teacher_model,
    )  # fmt: skip
    updates, total_steps = trainer.settings.updates_per_rollout, trainer.total_steps
    monitor, step_fn, extra_state = None, trainer.step_fn, trainer.extra_state
    if monitor_inputs is not None:
        monitor_reference = reference or starting_reference(policy, stage.lora is not None, reference_model)
        monitor = OverOptimizationMonitor(
            monitor_inputs, policy, tokenizer, monitor_reference, seed=seed, stage_name=stage_name, log=log,
            engine_at=trainer.engine_at if trainer.engine is not None else None,
        )  # fmt: skip
        step_fn, extra_state = monitor.wrap(trainer.step_fn), [*extra_state, monitor]
    try:
        trained, loop = run_optimizer_steps(
            trained_modules, stage.train, total_steps=total_steps, steps_per_epoch=updates,
            seed=seed, checkpoint_dir=checkpoint_dir, step_fn=step_fn, log=log, extra_state=extra_state,
            lr_of=lambda name: stage.ppo.value_lr if name.startswith("value.") else None,
        )  # fmt: skip
    except MonitorStop as stop:
        trained, loop, total_steps = trained_modules, stop.result, stop.step
    finally:
        trainer.close()
    monitor_summary = monitor.finish(total_steps) if monitor is not None else None
    if value_model is not None:
        policy, value_model = trained["policy"], trained["value"]
    else:
        policy = trained
    if stage.lora is not None:
        policy = policy.merge_and_unload()
    result = PolicyGradientResult(
        steps=total_steps,
        rollouts=math.ceil(total_steps / updates),
        resumed_from_step=loop.resumed_from_step,
        final_loss=loop.last_metrics.get("loss", math.nan),
        seconds=loop.seconds,
        input_tokens=loop.tokens,
        last_metrics=loop.last_metrics,
        last_rollout_metrics=trainer.last_rollout_metrics,
        monitor=monitor_summary,
    )
    return policy, value_model, result
