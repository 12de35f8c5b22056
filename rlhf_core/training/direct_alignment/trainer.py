"""Direct alignment (book ch.8): DPO and its family, trained against cached reference log-probs.

1. Pairs are tokenized as a sampled completion would follow its prompt (``tokenize_preference_rows``).
2. The reference model's log-probs log pi_ref(y|x) of every chosen and rejected completion are computed
   once, before training, and cached in a file keyed by the reference's digest, the data's digest and
   the tokenization settings (steps 1 and 2 live in :mod:`.reference`): training holds no reference
   model, and a second stage on the same pairs and reference (another beta, another loss) reuses the file.
   Reference-free losses (SimPO, ORPO) compute none.
3. Each optimizer step takes the step's pairs (a pure function of seed and step, so resume is exact),
   regroups them by length into micro-batches, and sends the chosen and the rejected sequences of a
   micro-batch through the policy in one forward pass; log-probs are summed over completion tokens
   only (of a tool-use trajectory, the model's own tokens: tool results are masked, book ch.13), the LM
   head never building the full (B, T, V) log-softmax (``sequence_logprobs``).
4. The loss is the stage's entry of ``DIRECT_ALIGNMENT_LOSSES``; logged per step: loss, implicit reward
   accuracy and margin, chosen/rejected rewards and policy log-probs. The book's displacement (both
   log-probs fall, the rejected more, while the margin widens) shows in those curves.

KTO trains on unpaired examples (an ``unpaired_preference`` dataset, or pairs split into a desirable
chosen and an undesirable rejected example); its KL reference point z_0 comes from mismatched pairs
(x_i, y_{i+1}), the next example's completion in data order, whose reference log-probs are cached with
the rest.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.errors import NonFiniteLossError, UserError
from rlhf_core.losses.direct_alignment import DIRECT_ALIGNMENT_LOSSES, LossSpec
from rlhf_core.losses.kl import sampled_kl
from rlhf_core.modeling.models import load_model
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.modeling.preference_tokens import (
    CompletionTokens,
)
from rlhf_core.rollout.generation import decode_batch
from rlhf_core.spec.stages.direct_alignment import DirectAlignmentStage
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training.direct_alignment.reference import (
    REFERENCE_BATCH,
    cached_reference_logprobs,
    check_labels,
    example_logprobs,
    example_sequences,
    reference_logprobs_file,
    tokenize_examples,
)
from rlhf_core.training.engine.data_parallel import main_process_first, rank_and_world
from rlhf_core.training.engine.loop import (
    TOKENS,
    LogFn,
    StepContext,
    plan_steps,
    rows_of_step,
    run_optimizer_steps,
)
from rlhf_core.training.engine.lora import apply_lora
from rlhf_core.training.engine.result import TrainingResult
from rlhf_core.training.monitor.overoptimization import (
    MonitorInputs,
    MonitorStop,
    OverOptimizationMonitor,
    load_monitor_inputs,
    starting_reference,
)


@dataclass(kw_only=True)
class DirectAlignmentResult(TrainingResult):
    examples: int  # pairs, or unpaired completions for KTO
    truncated: int  # rows kept with their prompt cut from the left
    skipped: int  # rows dropped for their length
    reference_cached: bool
    heldout: dict[str, float] = field(default_factory=dict)
    monitor: dict | None = None  # the over-optimization monitor's summary, when it ran

    def summary(self) -> dict[str, float]:
        shown = {
            "final_train_loss": self.final_loss,
            "steps": float(self.steps),
            "examples": float(self.examples),
            "skipped_rows": float(self.skipped),
            "truncated_prompts": float(self.truncated),
            "reference_logprobs_from_cache": float(self.reference_cached),
            "tokens_per_second": self.tokens_per_second,
        }
        shown |= {k.replace("eval/", "heldout_"): v for k, v in self.heldout.items() if k in HELDOUT_SHOWN}
        if self.resumed_from_step:
            shown["resumed_from_step"] = float(self.resumed_from_step)
        return shown


HELDOUT_SHOWN = ("eval/loss", "eval/accuracy", "eval/margin", "eval/kl_to_reference")


def loss_options(stage: DirectAlignmentStage, spec: LossSpec) -> dict[str, float | bool]:
    """The loss's keyword hyperparameters from the stage (beta and ``loss_options``), checked by name."""
    known = spec.hyperparameters
    unknown = sorted(set(stage.loss_options) - set(known))
    if unknown:
        allowed = ", ".join(f"{k} (default {v})" for k, v in known.items())
        raise UserError(
            f"loss '{stage.loss}' has no option(s) {', '.join(unknown)}; it takes: {allowed or 'none'}"
        )
    options = dict(stage.loss_options)
    if stage.beta is not None:
        if "beta" not in known:
            raise UserError(f"loss '{stage.loss}' takes no beta; its options: {', '.join(known)}")
        options["beta"] = stage.beta
    return options


def step_losses(
    spec: LossSpec,
    options: dict[str, float | bool],
    logps: torch.Tensor,
    lengths: torch.Tensor,
    reference: torch.Tensor | None,
    desirable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example losses and the logged quantities for one micro-batch.

    ``logps``/``lengths`` are (2, n) from :func:`example_logprobs`; ``reference`` the (n, 2) slice of
    the cached reference log-probs, or None (reference-free); ``desirable`` the (n,) KTO labels.
    """
    if spec.paired:
        tensors = {
            "policy_chosen_logps": logps[0],
            "policy_rejected_logps": logps[1],
            "chosen_lengths": lengths[0],
            "rejected_lengths": lengths[1],
        }
        if reference is not None:
            reference = reference.to(logps.dtype)
            tensors |= {
                "reference_chosen_logps": reference[:, 0],
                "reference_rejected_logps": reference[:, 1],
            }
        chosen, rejected = logps[0], logps[1]
    else:  # KTO: z_0 from the mismatched completions
        reference = reference.to(logps.dtype)
        tensors = {
            "policy_logps": logps[0],
            "reference_logps": reference[:, 0],
            "desirable": desirable,
            "policy_kl_logps": logps[1],
            "reference_kl_logps": reference[:, 1],
        }
        chosen, rejected = logps[0][desirable], logps[0][~desirable]
    result = spec.fn(*(tensors[name] for name in spec.inputs), **options)
    logged = {
        "chosen_reward": result.chosen_rewards,
        "rejected_reward": result.rejected_rewards,
        "chosen_logp": chosen.detach(),
        "rejected_logp": rejected.detach(),
        **result.metrics,
    }
    if spec.paired:
        logged["accuracy"] = (result.chosen_rewards > result.rejected_rewards).float()
        logged["margin"] = result.chosen_rewards - result.rejected_rewards
    # a KTO micro-batch may hold no desirable (or undesirable) example: its mean is left out, not NaN
    return result.losses, {k: v.float().mean() for k, v in logged.items() if v.numel()}


def train_direct_alignment(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list,
    reference: torch.Tensor | None,
    stage: DirectAlignmentStage,
    *,
    seed: int,
    checkpoint_dir: Path,
    stage_name: str = "direct_alignment",
    log: LogFn | None = None,
    monitor_inputs: MonitorInputs | None = None,
    monitor_reference: PreTrainedModel | None = None,
) -> tuple[PreTrainedModel, dict]:
    """Optimise ``model`` on tokenized examples (``PairTokens``, or ``CompletionTokens`` for KTO) with the
    stage's loss; ``reference`` is the (N, 2) cached reference log-probs (None for reference-free
    losses). Resumes from ``checkpoint_dir``. With ``monitor_inputs`` the over-optimization monitor
    evaluates the policy (KL to ``monitor_reference``, default its starting weights) and may stop
    training; the returned dict then has a ``monitor`` entry."""
    spec = DIRECT_ALIGNMENT_LOSSES[stage.loss]
    options = loss_options(stage, spec)
    cfg = stage.train
    torch.manual_seed(seed)
    if stage.lora is not None:
        model = apply_lora(model, stage.lora)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    steps_per_epoch, total_steps = plan_steps(len(examples), cfg)
    length = [max(len(x) + len(y) for x, y in example_sequences(examples, [i])) for i in range(len(examples))]
    labels = torch.tensor([getattr(e, "label", True) for e in examples])

    def step_fn(step: int, ctx: StepContext) -> dict[str, float]:
        # the step's loss is the mean over its examples however they are split, so similar lengths share a
        # micro-batch (less padding) and the gradient is unchanged
        picked = [
            order[i] for part in rows_of_step(len(examples), cfg, seed, step, steps_per_epoch) for i in part
        ]
        picked.sort(key=lambda i: length[i])
        totals: dict[str, float] = {TOKENS: 0.0}
        micro = [picked[start : start + cfg.batch_size] for start in range(0, len(picked), cfg.batch_size)]
        # all of them, or this rank's share (weights use the whole step); sharded: plus zero-weighted repeats
        for ids, counts in ctx.share(micro):
            logps, lengths = ctx.forward(
                example_logprobs, model, examples, ids, tokenizer.pad_token_id, cfg.shared_prefix
            )
            ref = reference[ids].to(ctx.device) if reference is not None else None
            losses, logged = step_losses(spec, options, logps, lengths, ref, labels[ids].to(ctx.device))
            loss = losses.mean()
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"stage '{stage_name}': the {stage.loss} loss is {loss.item()} at step {step + 1}; "
                    "training stops, the last checkpoint is kept and nothing is registered (lower lr?)"
                )
            weight = len(ids) / len(picked)
            if not counts:
                ctx.backward(loss * 0.0)
                continue
            ctx.backward(loss * weight)
            for key, value in {"loss": loss.detach(), **logged}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * weight
            totals[TOKENS] += float(sum(len(x) + len(y) for x, y in example_sequences(examples, ids)))
        return totals

    monitor = None
    if monitor_inputs is not None:
        provider = starting_reference(model, stage.lora is not None, monitor_reference)
        monitor = OverOptimizationMonitor(
            monitor_inputs, model, tokenizer, provider, seed=seed, stage_name=stage_name, log=log
        )
    try:
        trained, loop = run_optimizer_steps(
            model, cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch, seed=seed,
            checkpoint_dir=checkpoint_dir, step_fn=monitor.wrap(step_fn) if monitor else step_fn, log=log,
            extra_state=[monitor] if monitor else (),
        )  # fmt: skip
    except MonitorStop as stop:
        trained, loop, total_steps = model, stop.result, stop.step
    summary = {"monitor": monitor.finish(total_steps)} if monitor is not None else {}
    if stage.lora is not None:
        trained = trained.merge_and_unload()
    return trained, {
        "steps": total_steps,
        "resumed_from_step": loop.resumed_from_step,
        "final_loss": loop.last_metrics.get("loss", math.nan),
        "seconds": loop.seconds,
        "input_tokens": loop.tokens,
        **summary,
    }


@torch.no_grad()
def evaluate_direct_alignment(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list,
    reference: torch.Tensor | None,
    stage: DirectAlignmentStage,
) -> dict[str, float]:
    """Held-out loss, implicit reward accuracy and margin, rewards and log-probs on ``examples``."""
    spec = DIRECT_ALIGNMENT_LOSSES[stage.loss]
    options = loss_options(stage, spec)
    labels = torch.tensor([getattr(e, "label", True) for e in examples])
    totals: dict[str, float] = {}
    with eval_mode(model):
        for start in range(0, len(examples), REFERENCE_BATCH):
            ids = list(range(start, min(start + REFERENCE_BATCH, len(examples))))
            logps, lengths = example_logprobs(
                model, examples, ids, tokenizer.pad_token_id, stage.train.shared_prefix
            )
            ref = reference[ids].to(logps.device) if reference is not None else None
            losses, logged = step_losses(spec, options, logps, lengths, ref, labels[ids].to(logps.device))
            weight = len(ids) / len(examples)
            for key, value in {"loss": losses.mean(), **logged}.items():
                totals[f"eval/{key}"] = totals.get(f"eval/{key}", 0.0) + float(value) * weight
    totals["eval/examples"] = float(len(examples))
    return totals


@torch.no_grad()
def heldout_kl(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    prompts: list[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    seed: int,
) -> float:
    """KL(pi || pi_ref) ~ mean over y ~ pi(.|x) of log pi(y|x) - log pi_ref(y|x) (the k1 estimator,
    :func:`~rlhf_core.losses.kl.sampled_kl`, one sample at temperature 1 per prompt; book ch.15), on
    token-id prompts."""
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with eval_mode(policy), eval_mode(reference):
        completions = decode_batch(
            policy,
            prompts,
            1,
            max_new_tokens,
            1.0,
            1.0,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            generator,
        )
        examples = [
            CompletionTokens(p, c, True, i) for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
        ]
        kept = [e for e in examples if e.completion]
        if not kept:
            return 0.0
        ids = list(range(len(kept)))
        policy_logps, _ = example_logprobs(policy, kept, ids, tokenizer.pad_token_id)
        reference_logps, _ = example_logprobs(reference, kept, ids, tokenizer.pad_token_id)
    return float(sampled_kl(policy_logps[0], reference_logps[0]).mean())


@dataclass(frozen=True)
class DirectAlignmentInputs:
    """The ``direct_alignment`` stage's resolved inputs: the policy, the (optional) reference, the rows of
    the preference data's train and eval splits, and the monitor's prompt rows and reward models."""

    policy_dir: str  # a local directory or a hub name
    policy_revision: str | None
    train_rows: list[dict]
    eval_rows: list[dict] | None  # None: no held-out evaluation
    # what identifies the reference log-probs in the shared cache (the policy's digest when no reference)
    reference_digest: str
    data_digest: str
    data_name: str = "preferences"  # the preference data as the pipeline names it, for errors
    reference_dir: str | None = None  # None: the policy's starting weights are the reference
    reference_revision: str | None = None
    monitor_rows: list[dict] | None = None  # the over-optimization monitor's prompt rows
    monitor_model_dirs: dict[str, str] = field(default_factory=dict)  # its reward models by source name


def optimize_on_preferences(
    stage: DirectAlignmentStage, inputs: DirectAlignmentInputs, env: StageEnvironment
) -> DirectAlignmentResult:
    """The ``direct_alignment`` stage's work: tokenize, cache reference log-probs, train, evaluate; the
    result carries the trained policy and its tokenizer.

    The reference log-probs of each split are cached under ``env.cache_dir``
    (:func:`~.reference.reference_logprobs_file`), so a second stage on the same pairs and reference
    reuses them; the monitor keeps its best weights in ``env.checkpoint_dir``.
    """
    source = f"stage '{env.stage}' ({inputs.data_name})"
    if stage.monitor is not None and rank_and_world()[1] > 1:
        raise UserError(
            f"stage '{env.stage}': the over-optimization monitor runs in a single process; set "
            "compute.processes to 1 for a stage with monitor"
        )
    model, tokenizer = load_model(inputs.policy_dir, revision=inputs.policy_revision)
    spec = DIRECT_ALIGNMENT_LOSSES[stage.loss]
    loss_options(stage, spec)  # bad options fail before any work
    splits = {"train": inputs.train_rows, **({"eval": inputs.eval_rows} if inputs.eval_rows else {})}
    examples, reports = {}, {}
    for split, rows in splits.items():
        examples[split], reports[split] = tokenize_examples(
            rows, tokenizer, stage, f"{source} ({split} split)"
        )
    if not examples["train"]:
        raise UserError(f"stage '{env.stage}': no example fits in max_length {stage.train.max_length}")
    if not spec.paired:
        check_labels(examples["train"], env.stage, f"{source} (train split)")
    references: dict[str, torch.Tensor | None] = {split: None for split in examples}
    from_cache = False
    loaded: dict[str, PreTrainedModel] = {}

    def starting_reference() -> tuple[PreTrainedModel, int]:
        """The reference, loaded at most once for all splits; by default the policy itself, which is
        still at its starting weights here (no second copy is loaded)."""
        if inputs.reference_dir is None:
            return model, tokenizer.pad_token_id
        if "reference" not in loaded:
            loaded["reference"] = load_model(inputs.reference_dir, revision=inputs.reference_revision)[0]
        return loaded["reference"], tokenizer.pad_token_id

    if spec.needs_reference:
        with main_process_first():  # with several processes, one computes the cache and the others read it
            for split, items in examples.items():
                if items:
                    cache_file = reference_logprobs_file(
                        env.cache_dir, inputs.reference_digest, inputs.data_digest, stage, split
                    )
                    references[split], from_cache = cached_reference_logprobs(
                        cache_file, starting_reference, None, items, stage.train.shared_prefix
                    )
    loaded.clear()  # training holds no reference model (the monitor's KL estimate needs one)
    monitor_inputs, monitor_reference = None, None
    if stage.monitor is not None:
        monitor_inputs = load_monitor_inputs(
            stage.monitor, stage.monitor.proxy, inputs.monitor_rows or [], inputs.monitor_model_dirs,
            env.checkpoint_dir / "monitor", env.stage,
        )  # fmt: skip
        if inputs.reference_dir is not None:
            monitor_reference = load_model(inputs.reference_dir, revision=inputs.reference_revision)[0]
    trained, loop = train_direct_alignment(
        model, tokenizer, examples["train"], references["train"], stage, seed=env.seed,
        checkpoint_dir=env.checkpoint_dir, stage_name=env.stage, log=env.log, monitor_inputs=monitor_inputs,
        monitor_reference=monitor_reference,
    )  # fmt: skip
    heldout = {}
    if examples.get("eval"):
        heldout = evaluate_direct_alignment(trained, tokenizer, examples["eval"], references["eval"], stage)
        if stage.heldout_kl.prompts:
            prompts = list(dict.fromkeys(tuple(e.prompt) for e in examples["eval"]))[
                : stage.heldout_kl.prompts
            ]
            reference_model, _ = load_model(  # the starting weights: the policy has trained since
                inputs.reference_dir or inputs.policy_dir,
                revision=inputs.reference_revision if inputs.reference_dir else inputs.policy_revision,
            )
            heldout["eval/kl_to_reference"] = heldout_kl(
                trained,
                reference_model,
                [list(p) for p in prompts],
                tokenizer,
                stage.heldout_kl.max_new_tokens,
                env.seed,
            )
    report = reports["train"]
    result = DirectAlignmentResult(
        steps=loop["steps"],
        resumed_from_step=loop["resumed_from_step"],
        final_loss=loop["final_loss"],
        examples=len(examples["train"]),
        truncated=report.truncated,
        skipped=report.skipped,
        reference_cached=from_cache,
        seconds=loop["seconds"],
        input_tokens=loop["input_tokens"],
        heldout=heldout,
        monitor=loop.get("monitor"),
        model=trained,
        tokenizer=tokenizer,
    )
    return result
