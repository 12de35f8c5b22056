"""The over-optimization (Goodhart) monitor of policy optimization (book ch.14, ch.15).

Reward over-optimization: the proxy reward keeps rising while the true objective peaks and falls
(Gao et al. 2023 plot both against the KL to the initial policy). Every ``every`` optimizer steps, and
before the first and after the last, the monitor

1. lets the current policy answer a fixed list of held-out prompts (greedy by default) with the same
   KV-cached decoding the rollouts use (:func:`rlhf_core.rollout.generation.decode_batch`), or through
   the stage's rollout engine (below);
2. scores the answers with the proxy and the gold reward sources (their weighted sums, averaged over
   the prompts; truncated answers are scored too, and their share is logged);
3. estimates KL(pi || pi_ref) = E_{y ~ pi(.|x)}[log pi(y|x) - log pi_ref(y|x)] from ``kl_samples``
   completions per prompt sampled at temperature 1 (k1 summed over a completion's tokens, averaged;
   book ch.15 §16.1), reading both log-probs with :func:`rlhf_core.rollout.token_scoring.score_tokens`;
4. logs ``monitor/proxy``, ``monitor/gold``, ``monitor/kl`` (and per source, ``monitor/proxy/<source>``,
   ``monitor/gold/<source>``, plus ``monitor/truncated_share``) at that optimizer step.

Engine: a ``policy_gradient`` stage with ``generation.engine: vllm`` hands the monitor ``engine_at``
(step -> the trainer's engine, synced to the weights after ``step`` optimizer steps, the trainer's
bookkeeping kept so the rollout at that step does not sync again). The monitor then decodes its answers
and its KL samples there at every evaluation, before the first step and after the last too, so the
evaluations share one decoding rule; the log-probs of the KL estimate stay the trainer's own (native
forward passes). ``monitor.generation.engine: native`` keeps the native loop instead.

Early stop (``early_stop.patience = k``): when gold fell at each of the last k evaluations while proxy
rose over the same span (:func:`gold_fell_while_proxy_rose`), training stops (:class:`MonitorStop`)
and the weights of the evaluation with the best gold are put back into the policy, which the stage
then registers. With early stop on, that is also what a run that was never stopped registers.

Disk: the weights of an evaluation are written (``best-step-<N>.safetensors`` next to the
checkpoints, one copy of the policy's weights each) only when it is the best gold so far. A superseded
file is kept while a retained checkpoint still refers to it, so there are at most three copies (the
best so far and the best as of each of the two checkpoints the loop keeps), usually one; they go with
the checkpoints when the stage succeeds. The history (every evaluation) is checkpointed with the
trainer's state, and an evaluation draws from its own seeded generator and never from the global RNG,
so a resumed run repeats the same evaluations and decisions, and training with the monitor updates
the weights exactly as training without it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.data.schemas import prompt_key
from rlhf_core.errors import UserError
from rlhf_core.losses.kl import sampled_kl
from rlhf_core.modeling.completion_scoring import can_share_prefix
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.rewards.composite import ModelScorer, model_source_options, score_completions
from rlhf_core.rollout.engines.base import RolloutEngine, SamplingRequest
from rlhf_core.rollout.generation import decode_batch
from rlhf_core.rollout.token_scoring import encode_prompts, score_tokens
from rlhf_core.spec.monitor import MonitorSpec
from rlhf_core.spec.reward_sources import RewardSourceSpec
from rlhf_core.training.engine.loop import TOKENS, LogFn, LoopResult, StepContext, StepFn
from rlhf_core.training.monitor.history import (
    Evaluation,
    best_evaluation,
    gold_fell_while_proxy_rose,
)

KEPT_CHECKPOINTS = 2  # checkpoint.save_checkpoint keeps the newest two
ReferenceProvider = Callable[[], contextlib.AbstractContextManager]
EngineAt = Callable[[int], RolloutEngine]  # optimizer step -> an engine holding the weights of that step


@dataclass
class MonitorInputs:
    """What the stage hands the monitor: its spec, proxy, prompt rows and reward-model scorers."""

    spec: MonitorSpec
    proxy: tuple[RewardSourceSpec, ...]
    records: list[dict]  # prompt rows: ``prompt`` and what the reward functions read (``answer``)
    scorers: dict[str, ModelScorer]
    weights_dir: Path


def load_monitor_inputs(
    spec: MonitorSpec,
    proxy: tuple[RewardSourceSpec, ...],
    records: list[dict],
    model_dirs: dict[str, str],
    weights_dir: Path,
    stage_name: str,
    loaded: dict[str, ModelScorer] | None = None,
) -> MonitorInputs:
    """The monitor's inputs: the rows of the first ``max_prompts`` distinct prompts and a scorer per
    reward-model source (reusing ``loaded`` scorers of the same name)."""
    from rlhf_core.rewards.reward_model_scoring import load_reward_model_scorer

    if not records:
        raise UserError(f"stage '{stage_name}', field monitor.prompts: the split '{spec.split}' has no rows")
    first = {}
    for row in records:
        first.setdefault(prompt_key(row["prompt"]), row)
    scorers = dict(loaded or {})
    options = model_source_options((*proxy, *spec.gold))
    for name, directory in model_dirs.items():
        if name not in scorers:
            scorers[name] = load_reward_model_scorer(directory, options.get(name), source=name)
    return MonitorInputs(spec, proxy, list(first.values())[: spec.max_prompts], scorers, weights_dir)


def starting_reference(
    policy: PreTrainedModel, lora: bool, loaded: PreTrainedModel | None
) -> ReferenceProvider:
    """pi_ref for the KL estimate: a loaded reference; the LoRA policy with its adapters off; or a
    frozen copy of the policy's starting weights (one more copy of the policy in memory). A reference
    model follows the policy to its device when it is used."""
    if lora and loaded is None:
        return lambda: _adapters_off(policy)
    frozen = loaded if loaded is not None else copy.deepcopy(policy)
    frozen.eval().requires_grad_(False)
    return lambda: contextlib.nullcontext(frozen.to(next(policy.parameters()).device))


@contextlib.contextmanager
def _adapters_off(policy: PreTrainedModel):
    """The LoRA policy itself with its adapters off: the starting weights (peft's ``disable_adapter``
    yields nothing, and a reference provider must yield the model)."""
    with policy.disable_adapter():
        yield policy


class MonitorStop(Exception):
    """Raised from a training step when the early-stop rule fires; ``result`` stands for the loop's."""

    def __init__(self, step: int, result: LoopResult):
        super().__init__(f"over-optimization monitor stopped training at step {step}")
        self.step, self.result = step, result


class OverOptimizationMonitor:
    """Evaluates the policy during training; its ``state_dict`` goes into every checkpoint."""

    def __init__(
        self,
        inputs: MonitorInputs,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        reference: ReferenceProvider,
        *,
        seed: int,
        stage_name: str,
        log: LogFn | None,
        engine_at: EngineAt | None = None,
    ) -> None:
        self.inputs, self.spec, self.policy, self.tokenizer = inputs, inputs.spec, policy, tokenizer
        self.engine_at = engine_at if self.spec.generation.engine == "stage" else None
        self.reference, self.seed, self.stage_name = reference, seed, stage_name
        self.log = log or (lambda metrics, step: None)
        self.prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in inputs.records])
        self.history: list[Evaluation] = []
        self.stopped_at: int | None = None
        self._pinned: list[int] = []  # best steps that the retained checkpoints refer to
        self._progress = LoopResult(total_steps=0, resumed_from_step=-1)
        self._started = 0.0

    # -- checkpointed state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.history:  # called when a checkpoint is written: it refers to the best weights so far
            self._pinned = [*self._pinned, best_evaluation(self.history).step][-KEPT_CHECKPOINTS:]
        return {"history": [asdict(e) for e in self.history], "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [Evaluation(**e) for e in state["history"]]
        self.stopped_at = state["stopped_at"]
        self._pinned = [best_evaluation(self.history).step] if self.history else []
        self._prune()  # weights written after this checkpoint are rewritten when the run gets there

    # -- hooks -------------------------------------------------------------------------------------
    def wrap(self, step_fn: StepFn) -> StepFn:
        """``step_fn`` preceded, every ``every`` steps, by an evaluation of the weights after ``step``
        optimizer steps; keeps the counts a stopped loop cannot return."""

        def monitored(step: int, ctx: StepContext) -> dict[str, float]:
            if self._progress.resumed_from_step < 0:
                self._progress.resumed_from_step, self._started = step, time.perf_counter()
            if step % self.spec.every == 0:
                self.evaluate_and_check(step)
            metrics = step_fn(step, ctx)
            self._progress.tokens += int(metrics.get(TOKENS, 0))
            self._progress.last_metrics = {k: v for k, v in metrics.items() if k != TOKENS}
            return metrics

        return monitored

    def evaluate_and_check(self, step: int) -> None:
        if self.history and self.history[-1].step == step:
            return
        self.evaluate(step)
        patience = self.spec.early_stop.patience if self.spec.early_stop else None
        if patience is not None and gold_fell_while_proxy_rose(self.history, patience):
            self.stopped_at = step
            best = best_evaluation(self.history)
            self.log({"monitor/stopped_at_step": float(step), "monitor/best_step": float(best.step)}, step)
            self._progress.total_steps = step
            self._progress.seconds = time.perf_counter() - self._started
            raise MonitorStop(step, self._progress)

    def finish(self, total_steps: int) -> dict[str, Any]:
        """After training: the last evaluation (unless stopped), the best weights back in the policy
        when early stop is on, and the summary the task records."""
        if self.stopped_at is None and (not self.history or self.history[-1].step != total_steps):
            self.evaluate(total_steps)
        best = best_evaluation(self.history)
        registered = self.stopped_at if self.stopped_at is not None else self.history[-1].step
        if self.spec.early_stop is not None:
            if best.step != self.history[-1].step:
                from safetensors.torch import load_model

                load_model(self.policy, str(self.inputs.weights_dir / best.checkpoint))
            registered = best.step
        return {
            "history": [asdict(e) for e in self.history],
            "stopped_at_step": self.stopped_at,
            "best_step": best.step,
            "registered_step": registered,
            "reason": self.reason(best),
        }

    def reason(self, best: Evaluation) -> str:
        if self.stopped_at is None:
            return "not stopped" + (f"; best gold at step {best.step}" if self.spec.early_stop else "")
        span = self.history[-(self.spec.early_stop.patience + 1) :]
        return (
            f"gold fell {len(span) - 1} evaluations in a row ({span[0].gold:.4g} -> {span[-1].gold:.4g}, "
            f"steps {span[0].step}-{span[-1].step}) while proxy rose ({span[0].proxy:.4g} -> "
            f"{span[-1].proxy:.4g}); KL {span[-1].kl:.3g}; registered the best gold ({best.gold:.4g}) "
            f"of step {best.step}"
        )

    # -- one evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, step: int) -> Evaluation:
        gen, records = self.spec.generation, self.inputs.records
        engine = self.engine_at(step) if self.engine_at is not None else None
        answers = self._decode(engine, 1, gen.temperature, gen.top_p, self.seed * 7_333 + step)
        texts = [t.strip() for t in self.tokenizer.batch_decode(answers, skip_special_tokens=True)]
        rows = [
            {**record, "completion": text, "completion_tokens": len(ids)}
            for record, text, ids in zip(records, texts, answers, strict=True)
        ]
        proxy, proxy_sources = self._score(rows, self.inputs.proxy, "proxy")
        gold, gold_sources = self._score(rows, self.spec.gold, "gold")
        truncated = statistics.fmean(float(a[-1] != self.tokenizer.eos_token_id) for a in answers)
        evaluation = Evaluation(
            step, self._kl(engine, step), proxy, gold, {**proxy_sources, **gold_sources}, truncated
        )
        if engine is not None:
            engine.release_memory()  # the device is the trainer's again
        if not self.history or evaluation.gold > best_evaluation(self.history).gold:
            evaluation.checkpoint = self._save_weights(step)
        self.history.append(evaluation)
        metrics = {"monitor/kl": evaluation.kl, "monitor/proxy": proxy, "monitor/gold": gold}
        metrics |= {f"monitor/{k}": v for k, v in evaluation.sources.items()}
        self.log({**metrics, "monitor/truncated_share": truncated}, step)
        return evaluation

    def _decode(
        self, engine: RolloutEngine | None, n: int, temperature: float, top_p: float, seed: int
    ) -> list[list[int]]:
        """``n`` completions of every prompt (prompt-major), by ``engine`` or natively in batches."""
        max_new_tokens, eos = self.spec.generation.max_new_tokens, self.tokenizer.eos_token_id
        if engine is not None:
            request = SamplingRequest(max_new_tokens, temperature, top_p, eos_token_id=eos)
            return engine.generate(self.prompt_ids, n, request, seed).token_ids
        device = next(self.policy.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        per_batch = max(1, self.spec.generation.batch_size // n)
        out: list[list[int]] = []
        with eval_mode(self.policy):
            for start in range(0, len(self.prompt_ids), per_batch):
                out += decode_batch(
                    self.policy, self.prompt_ids[start : start + per_batch], n,
                    max_new_tokens, temperature, top_p, eos, self.tokenizer.pad_token_id, generator,
                )  # fmt: skip
        return out

    def _score(
        self, rows: list[dict], sources: tuple[RewardSourceSpec, ...], role: str
    ) -> tuple[float, dict[str, float]]:
        """Mean weighted reward of the rows under ``sources``, and each source's mean."""
        scored, _ = score_completions(
            rows, sources, self.inputs.scorers, on_invalid="fail", stage=f"{self.stage_name} (monitor.{role})"
        )
        means = {f"{role}/{s.name}": statistics.fmean(r["scores"][s.name] for r in scored) for s in sources}
        return statistics.fmean(r["reward"] for r in scored), means

    def _kl(self, engine: RolloutEngine | None, step: int) -> float:
        """sum_t (log pi - log pi_ref) per sampled completion, averaged (k1; samples from the policy, or
        from the engine holding its weights; both log-probs from native forward passes)."""
        n = self.spec.kl_samples
        completions = self._decode(engine, n, 1.0, 1.0, self.seed * 7_919 + step + 1)
        prompts = [p for p in self.prompt_ids for _ in range(n)]
        groups = [k // n for k in range(len(completions))]
        policy_logps, _, ref_logps, _ = score_tokens(
            self.policy, self.reference, None, prompts, completions, groups, self.tokenizer.pad_token_id,
            can_share_prefix(self.policy), self.spec.generation.batch_size,
        )  # fmt: skip
        lengths = torch.tensor([len(c) for c in completions])
        mask = torch.arange(policy_logps.shape[1])[None, :] < lengths[:, None]
        kl = sampled_kl(policy_logps, ref_logps, mask).mean()
        value = float(kl)
        if not math.isfinite(value):
            raise UserError(f"stage '{self.stage_name}': the monitor's KL estimate is {value} at step {step}")
        return value

    # -- best weights on disk ----------------------------------------------------------------------
    def _save_weights(self, step: int) -> str:
        from safetensors.torch import save_model

        directory = self.inputs.weights_dir
        directory.mkdir(parents=True, exist_ok=True)
        name = f"best-step-{step}.safetensors"
        tmp = directory / f".{name}.tmp"
        save_model(self.policy, str(tmp))
        os.replace(tmp, directory / name)
        self._prune(keep_also=step)
        return name

    def _prune(self, keep_also: int | None = None) -> None:
        """Delete best-weights files that neither the current best nor a retained checkpoint needs."""
        directory = self.inputs.weights_dir
        if not directory.is_dir():
            return
        keep = {f"best-step-{s}.safetensors" for s in self._pinned}
        if keep_also is not None:
            keep.add(f"best-step-{keep_also}.safetensors")
        elif self.history:
            keep.add(f"best-step-{best_evaluation(self.history).step}.safetensors")
        for path in directory.glob("best-step-*.safetensors"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
