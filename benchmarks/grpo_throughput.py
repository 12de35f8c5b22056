"""Side-by-side GRPO training throughput: our ``policy_gradient`` stage (``algorithm: grpo``) against TRL's
``GRPOTrainer``, without vLLM on either side.

All contenders start from the same saved, briefly SFT-trained tiny Llama (``sft_policy.py``), train on the
same set of prompts (``synthetic_records("arithmetic", "prompts", ...)``, each prompt used once), sample G
(default 8) completions per prompt from the policy being trained (temperature 1.0, top_p 1.0, no top-k, at
most 24 new tokens by default, stopping at the tokenizer's EOS ``<|im_end|>``), reward each completion with
the same verifier (``REWARD_FUNCTIONS["arithmetic_exact"]`` on the stripped completion text, every
completion scored, a truncated one too), normalize the rewards per group ((r - mean) / (std + 1e-4)), and
make one AdamW update per rollout with the clipped surrogate (eps 0.2 / 0.2), the per-token losses of the
rollout averaged over all its completion tokens (TRL's default ``loss_type="dapo"``; ours
``aggregation: token``). Same lr, constant schedule, no warmup, grad clip 1.0, weight decay 0, seed, fp32
on CPU, no gradient checkpointing, no bf16. One optimizer step = one rollout = P prompts x G completions,
in micro-batches of the same size. Four contenders, each in a fresh subprocess:

- ours_beta0 / ours_beta: ``train_policy_gradient`` with the stage's defaults apart from the settings
  above; beta 0 loads no reference; beta > 0 puts beta x k3 KL per token in the loss, with a frozen copy
  of the policy's starting weights as reference (what the stage does when no reference is given).
- trl_beta0 / trl_beta: ``GRPOTrainer`` with conversational prompts (it applies the chat template with the
  generation header itself; the worker asserts, every step, that its prompt token ids are ours),
  ``num_iterations=1`` and ``steps_per_generation`` at its default (= gradient accumulation), so one
  generation batch per optimizer step and no old-log-prob pass; at beta > 0 TRL loads its reference from
  the policy's directory (``config._name_or_path``) and adds the same k3 KL per token.

Measured per run (contenders alternate, the order flips every repeat; medians over repeats):
- completions/s = completions trained on (steps x P x G, the same for all) / seconds of the training loop.
  Ours: ``seconds`` of ``train_policy_gradient`` (its optimizer loop, rollouts included). TRL: the time
  between the ``on_train_begin`` and ``on_train_end`` callbacks.
- generated tokens/s = completion tokens sampled (each completion up to and including its EOS) / loop s;
  tokens/s = real tokens (prompt + completion of every completion; a group's prompt counts G times for
  both, though ours computes it once per group) / loop s. The two sides sample differently, so completion
  lengths differ: tokens/s is the fair unit, completions/s the issue's. The mean completion length, the
  share of truncated completions (no EOS within the limit) and the mean reward are reported with them.
- time split, summed over the run. generation: sampling the completions (ours: the stage's logged
  ``time/sample_and_reward_s`` less the reward time; TRL: ``_generate``, tokenizing the prompts and turning
  the ids back into text included); reward: the reward call (ours: the stage's reward function; TRL:
  ``_calculate_rewards``); scoring: the rest of the rollout (ours: ``time/scoring_s``: the reference pass
  at beta > 0; no policy pass at one update per rollout, the update's own forward is pi_old; TRL: the rest of
  ``_generate_and_score_completions``: the reference pass at beta > 0, padding, advantages, its metrics);
  update: the forward and backward passes of the loss (ours: ``time/update_s``; TRL: ``training_step`` less
  the rollout it triggers); other: the loop time left (optimizer step, clipping, scheduler, bookkeeping).
- peak RSS = ``ru_maxrss`` of the worker after training; RSS before = policy (TRL: and its reference)
  loaded and the prompts built, before the loop.

Differences left in on purpose (each side as it runs): ours decodes with its own KV-cached loop (a
group's prompt pre-filled once, finished rows leave the batch), TRL with ``model.generate`` on the
prompt repeated G times; ours scores and updates on shared-prefix rows (a group's prompt once per row),
TRL on one left/right-padded row per completion; at one update per rollout neither side runs a separate
old-log-prob pass (both compute the entropy in the loss forward); the two sides draw the prompts in
different shuffled orders and sample with different random streams, so their completions differ (hence
the mean length, truncated share and reward columns).

    .venv/bin/python benchmarks/grpo_throughput.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import workers
from machine_load import BackgroundMeter
from report import ratios, write_report
from sft_policy import POLICY_TASK, run_with_policy
from sft_throughput import VERSION_PACKAGES, current_rss_mib, peak_rss_mib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")

CONTENDERS = ("ours_beta0", "trl_beta0", "ours_beta", "trl_beta")
PAIRS = (("ours_beta0", "trl_beta0"), ("ours_beta", "trl_beta"))
TARGET_SPEEDUP = 1.5  # ours >= 1.5x TRL's completions/s and tokens/s at no more peak memory
PHASES = ("generation_s", "reward_s", "scoring_s", "update_s", "other_s")
MEDIAN_FIELDS = (
    "completions_per_second",
    "completion_tokens_per_second",
    "tokens_per_second",
    "seconds",
    *PHASES,
    "completion_tokens",
    "tokens",
    "mean_completion_length",
    "truncated_share",
    "mean_reward",
    "peak_rss_mib",
    "rss_before_mib",
)


@dataclass
class BenchSettings:
    """Settings shared by every contender (one source of truth, passed to every worker)."""

    steps: int  # optimizer steps = rollouts
    prompts_per_step: int  # P
    group_size: int  # G
    micro_batch: int  # completions per forward/backward pass of the update
    max_completion_length: int
    temperature: float
    lr: float
    beta: float  # the KL coefficient of the *_beta contenders
    seed: int

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def n_prompts(self) -> int:
        return self.steps * self.prompts_per_step


@dataclass
class RunResult:
    contender: str
    beta: float
    completions: int
    completion_tokens: int  # generated, each completion up to and including its EOS
    tokens: int  # prompt + completion tokens of every completion
    seconds: float  # the training loop
    completions_per_second: float
    completion_tokens_per_second: float
    tokens_per_second: float
    generation_s: float
    reward_s: float
    scoring_s: float
    update_s: float
    other_s: float
    mean_completion_length: float
    truncated_share: float
    mean_reward: float
    peak_rss_mib: float
    rss_before_mib: float
    torch_threads: int
    background_cores: float  # CPU used by other processes during the loop


@dataclass
class Tally:
    """What a run sampled and how long its phases took, summed over the run."""

    completions: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    truncated: int = 0
    reward_sum: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def add_time(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def result(self, contender: str, s: BenchSettings, beta: float, seconds: float, split: dict, peak: float,
               rss_before: float, threads: int, background: float) -> RunResult:  # fmt: skip
        expected = s.steps * s.completions_per_step
        assert self.completions == expected, (
            f"{contender}: {self.completions} completions, expected {expected}"
        )
        tokens = self.prompt_tokens + self.completion_tokens
        other = seconds - sum(split.values())
        return RunResult(
            contender, beta, self.completions, self.completion_tokens, tokens, seconds,
            self.completions / seconds, self.completion_tokens / seconds, tokens / seconds,
            split["generation_s"], split["reward_s"], split["scoring_s"], split["update_s"], other,
            self.completion_tokens / self.completions, self.truncated / self.completions,
            self.reward_sum / self.completions, peak, rss_before, threads, background,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------- workers


def prompt_rows(s: BenchSettings) -> list[dict]:
    """``prompt`` and ``answer`` rows: steps x P prompts, each drawn once by both sides."""
    from rlhf_core.data.synthetic import synthetic_records

    return synthetic_records("arithmetic", "prompts", n=s.n_prompts, seed=s.seed, **POLICY_TASK)


def our_prompt_ids(tokenizer, rows: list[dict]) -> dict[str, list[int]]:
    """Prompt text -> the token ids our rollouts decode from (chat template + generation header)."""
    from rlhf_core.rollout.token_scoring import encode_prompts

    texts = [r["prompt"] for r in rows]
    return dict(zip(texts, encode_prompts(tokenizer, texts), strict=True))


def grpo_stage(s: BenchSettings, beta: float):
    from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage

    return PolicyGradientStage.model_validate(
        {
            "kind": "policy_gradient",
            "algorithm": "grpo",
            "policy": "policy",
            "prompts": "data.prompts",
            "rewards": [{"function": "arithmetic_exact"}],
            "rollouts": s.steps,
            "prompts_per_rollout": s.prompts_per_step,
            "group_size": s.group_size,
            "update_epochs": 1,
            "minibatches": 1,
            "clip_low": 0.2,
            "clip_high": 0.2,
            "kl": {"beta": beta},  # in the loss, k3 (the grpo defaults), as TRL
            "aggregation": "token",  # TRL's default loss_type "dapo"
            "truncated": "score",  # the verifier scores every completion, as TRL's reward function does
            "generation": {
                "max_new_tokens": s.max_completion_length,
                "temperature": s.temperature,
                "top_p": 1.0,
                "batch_size": s.completions_per_step,  # the whole rollout in one decode batch, as TRL
            },
            "train": {
                "lr": s.lr,
                "weight_decay": 0.0,
                "batch_size": s.micro_batch,
                "warmup_ratio": 0.0,
                "schedule": "constant",
                "max_grad_norm": 1.0,
                "precision": "fp32",
                "checkpoint_every": 10**6,  # no checkpoint inside the timed loop
                "log_every": 1,  # per-step phase times; the log function only appends to a list
            },
        }
    )


def run_ours(model_dir: Path, s: BenchSettings, beta: float) -> RunResult:
    """The stage's work: ``train_policy_gradient`` on the loaded policy (the reference, at beta > 0, is the
    frozen copy of its starting weights that the stage makes)."""
    import torch

    from rlhf_core.modeling.models import load_model
    from rlhf_core.training.policy_gradient.rollouts import reward_function
    from rlhf_core.training.policy_gradient.trainer import train_policy_gradient

    model, tokenizer = load_model(str(model_dir))
    rows = prompt_rows(s)
    stage = grpo_stage(s, beta)
    assert stage.needs_reference == (beta > 0)
    prompt_len = {text: len(ids) for text, ids in our_prompt_ids(tokenizer, rows).items()}
    tally = Tally()
    score = reward_function(stage.rewards, {}, "bench")

    def timed_reward(batch: list[dict]):
        started = time.perf_counter()
        out = score(batch)
        tally.add_time("reward_s", time.perf_counter() - started)
        tally.completions += len(batch)
        tally.completion_tokens += sum(r["completion_tokens"] for r in batch)
        tally.prompt_tokens += sum(prompt_len[r["prompt"]] for r in batch)
        tally.reward_sum += sum(out[0])
        return out

    logged: list[dict[str, float]] = []
    rss_before = current_rss_mib()
    meter = BackgroundMeter().start()
    with tempfile.TemporaryDirectory() as tmp:
        _, _, summary = train_policy_gradient(
            model, tokenizer, rows, stage, timed_reward, seed=s.seed, checkpoint_dir=Path(tmp) / "ckpt",
            log=lambda metrics, step: logged.append(metrics),
        )  # fmt: skip
    background, peak = meter.stop(), peak_rss_mib()
    rollouts = [m for m in logged if "rollout/reward_mean" in m]  # logged once per rollout
    updates = [m for m in logged if "train/loss" in m]  # logged every update (log_every 1)
    assert len(rollouts) == len(updates) == s.steps, (len(rollouts), len(updates), s.steps)

    def total(entries: list[dict[str, float]], key: str) -> float:
        return sum(m[key] for m in entries)

    tally.truncated = round(total(rollouts, "rollout/truncated_share") * s.completions_per_step)
    split = {
        "generation_s": total(rollouts, "rollout/time/sample_and_reward_s") - tally.phases["reward_s"],
        "reward_s": tally.phases["reward_s"],
        "scoring_s": total(rollouts, "rollout/time/scoring_s"),
        "update_s": total(updates, "train/time/update_s"),
    }
    name = "ours_beta" if beta > 0 else "ours_beta0"
    return tally.result(
        name, s, beta, summary.seconds, split, peak, rss_before, torch.get_num_threads(), background
    )


def trl_config(s: BenchSettings, out_dir: str, beta: float):
    """GRPOConfig with every default that differs from ours set explicitly."""
    from trl import GRPOConfig

    if s.completions_per_step % s.micro_batch:
        raise SystemExit("prompts-per-step x group-size must be a multiple of --micro-batch")
    return GRPOConfig(
        output_dir=out_dir,
        seed=s.seed,
        data_seed=s.seed,
        use_cpu=True,
        max_steps=s.steps,
        per_device_train_batch_size=s.micro_batch,  # completions per micro-batch
        gradient_accumulation_steps=s.completions_per_step // s.micro_batch,
        # steps_per_generation / generation_batch_size left at their defaults: one generation batch of
        # P x G completions per optimizer step
        num_generations=s.group_size,
        num_iterations=1,
        max_completion_length=s.max_completion_length,
        temperature=s.temperature,
        top_p=1.0,
        top_k=0,
        use_vllm=False,
        beta=beta,
        epsilon=0.2,
        loss_type="dapo",  # TRL's default, named so a change of default cannot slip in
        scale_rewards="group",
        learning_rate=s.lr,  # TRL's GRPO default is 1e-6
        weight_decay=0.0,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        bf16=False,  # TRL's default is True, even on CPU
        fp16=False,
        activation_checkpointing=False,  # TRL's default (gradient_checkpointing) is True
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        torch_compile=False,
    )


def run_trl(model_dir: Path, s: BenchSettings, beta: float) -> RunResult:
    """TRL's GRPOTrainer on the same prompts, with the same verifier as its reward function."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from rlhf_core.modeling.models import load_model
    from rlhf_core.rewards.functions import REWARD_FUNCTIONS

    verifier = REWARD_FUNCTIONS["arithmetic_exact"]
    model, tokenizer = load_model(str(model_dir))
    rows = prompt_rows(s)
    ours_ids = our_prompt_ids(tokenizer, rows)
    tally = Tally()
    probe: dict[str, float] = {}

    def arithmetic_exact(prompts, completions, answer, **kwargs) -> list[float]:
        """The verifier on the completion text, stripped as our rollouts strip it."""
        return [
            verifier(c[0]["content"].strip(), {"prompt": p[-1]["content"], "answer": a})
            for p, c, a in zip(prompts, completions, answer, strict=True)
        ]

    class LoopTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            probe["rss_before"], probe["meter"] = current_rss_mib(), BackgroundMeter().start()
            probe["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            probe["end"], probe["background"] = time.perf_counter(), probe["meter"].stop()

    class TimedGRPOTrainer(GRPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch):
            started = time.perf_counter()
            out = super().training_step(model, inputs, num_items_in_batch)
            tally.add_time("training_step", time.perf_counter() - started)
            return out

        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            tally.add_time("rollout", time.perf_counter() - started)
            return out

        def _generate(self, prompts):
            started = time.perf_counter()
            out = super()._generate(prompts)
            tally.add_time("generation_s", time.perf_counter() - started)
            prompt_ids, completion_ids = out[0], out[1]
            for prompt, p_ids, c_ids in zip(prompts, prompt_ids, completion_ids, strict=True):
                text = prompt[-1]["content"]
                if list(p_ids) != ours_ids[text]:
                    raise AssertionError(
                        f"TRL's prompt ids for {text!r}: {list(p_ids)}, ours {ours_ids[text]}"
                    )
                tally.completions += 1
                tally.prompt_tokens += len(p_ids)
                tally.completion_tokens += len(c_ids)
                tally.truncated += int(not c_ids or c_ids[-1] not in self.eos_token_ids)
            return out

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            started = time.perf_counter()
            out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            tally.add_time("reward_s", time.perf_counter() - started)
            tally.reward_sum += float(out.sum())
            return out

    out_dir = tempfile.mkdtemp(prefix="trl-grpo-bench-")
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )
    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=arithmetic_exact,
        args=trl_config(s, out_dir, beta),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[LoopTimer()],
    )
    assert not trainer.args.activation_checkpointing and not trainer.model.is_activation_checkpointing
    assert not trainer.args.bf16 and not trainer.args.fp16 and not trainer.use_vllm
    assert trainer.args.steps_per_generation == trainer.args.gradient_accumulation_steps
    assert trainer.args.generation_batch_size == s.completions_per_step
    assert trainer.loss_type == "dapo" and trainer.num_iterations == 1
    assert tokenizer.eos_token_id in trainer.eos_token_ids and (trainer.ref_model is None) == (beta == 0)
    trainer.train()
    peak = peak_rss_mib()
    shutil.rmtree(out_dir, ignore_errors=True)
    seconds = probe["end"] - probe["start"]
    phases = tally.phases
    split = {
        "generation_s": phases["generation_s"],
        "reward_s": phases["reward_s"],
        "scoring_s": phases["rollout"] - phases["generation_s"] - phases["reward_s"],
        "update_s": phases["training_step"] - phases["rollout"],
    }
    seen = trainer.state.num_input_tokens_seen
    assert seen == tally.prompt_tokens + tally.completion_tokens, (seen, tally)
    name = "trl_beta" if beta > 0 else "trl_beta0"
    return tally.result(
        name, s, beta, seconds, split, peak, probe["rss_before"], torch.get_num_threads(), probe["background"]
    )


def worker_main(args: argparse.Namespace) -> None:
    settings = BenchSettings(**json.loads(args.settings))
    model_dir = Path(args.model_dir)
    beta = settings.beta if args.worker.endswith("_beta") else 0.0
    if args.worker.startswith("ours"):
        result = run_ours(model_dir, settings, beta)
    else:
        result = run_trl(model_dir, settings, beta)
    workers.emit_result(result)


# ----------------------------------------------------------------------------------------------- driver


def run_worker(contender: str, model_dir: Path, settings: BenchSettings) -> RunResult:
    return workers.run_contender(__file__, RunResult, contender, model_dir, settings)


def run_quiet(contender: str, model_dir: Path, settings: BenchSettings, args, discarded: list) -> RunResult:
    return workers.run_contender_quietly(__file__, RunResult, contender, model_dir, settings, args, discarded)


def summarize(runs: list[RunResult]) -> dict:
    by = {c: [r for r in runs if r.contender == c] for c in CONTENDERS}
    summary: dict = {}
    for c, rs in by.items():
        summary[c] = {f"median_{f}": statistics.median(getattr(r, f) for r in rs) for f in MEDIAN_FIELDS}
        summary[c]["min_completions_per_second"] = min(r.completions_per_second for r in rs)
        summary[c]["max_completions_per_second"] = max(r.completions_per_second for r in rs)
        summary[c]["max_background_cores"] = max(r.background_cores for r in rs)
        summary[c]["repeats"] = len(rs)
    summary["same_completions_in_every_run"] = len({r.completions for r in runs}) == 1
    for ours, theirs in PAIRS:
        vs = {
            measure: ratios(by[ours], by[theirs], measure)
            for measure in ("completions_per_second", "completion_tokens_per_second", "tokens_per_second")
        }
        vs["peak_rss"] = ratios(by[ours], by[theirs], "peak_rss_mib")
        memory_ok = vs["peak_rss"]["ratio_of_medians"] <= 1.0
        for measure in ("completions_per_second", "tokens_per_second"):
            vs[f"target_met_{measure}"] = vs[measure]["ratio_of_medians"] >= TARGET_SPEEDUP and memory_ok
        summary[f"{ours}_vs_{theirs}"] = vs
    return summary


def print_table(s: dict) -> None:
    print(
        f"{'contender':11} {'compl/s':>7} {'(min-max)':>11} {'gen tok/s':>9} {'tok/s':>6} {'loop s':>6} "
        f"{'gen s':>6} {'rew s':>5} {'score s':>7} {'upd s':>6} {'other s':>7} {'len':>5} {'trunc':>5} "
        f"{'reward':>6} {'peak RSS':>8} {'RSS before':>10}"
    )
    for c in CONTENDERS:
        m = s[c]
        spread = f"{m['min_completions_per_second']:.0f}-{m['max_completions_per_second']:.0f}"
        print(
            f"{c:11} {m['median_completions_per_second']:7.1f} {spread:>11} "
            f"{m['median_completion_tokens_per_second']:9.0f} {m['median_tokens_per_second']:6.0f} "
            f"{m['median_seconds']:6.2f} {m['median_generation_s']:6.2f} {m['median_reward_s']:5.2f} "
            f"{m['median_scoring_s']:7.2f} {m['median_update_s']:6.2f} {m['median_other_s']:7.2f} "
            f"{m['median_mean_completion_length']:5.1f} {m['median_truncated_share']:5.2f} "
            f"{m['median_mean_reward']:6.3f} {m['median_peak_rss_mib']:8.0f} "
            f"{m['median_rss_before_mib']:10.0f}"
        )
    print(f"same number of completions in every run: {s['same_completions_in_every_run']}")
    for ours, theirs in PAIRS:
        v = s[f"{ours}_vs_{theirs}"]
        shown = {
            measure: f"x{v[measure]['ratio_of_medians']:.2f} (x{v[measure]['median_of_per_repeat']:.2f})"
            for measure in ("completions_per_second", "completion_tokens_per_second", "tokens_per_second")
        }
        print(
            f"{ours}/{theirs} (ratio of medians, per-repeat median): completions/s "
            f"{shown['completions_per_second']}, generated tokens/s {shown['completion_tokens_per_second']}, "
            f"tokens/s {shown['tokens_per_second']}, peak RSS "
            f"x{v['peak_rss']['ratio_of_medians']:.2f} -> target (>= {TARGET_SPEEDUP}x, <= 1.0x RSS): "
            f"completions/s {'MET' if v['target_met_completions_per_second'] else 'NOT MET'}, tokens/s "
            f"{'MET' if v['target_met_tokens_per_second'] else 'NOT MET'}"
        )


def settings_from(args: argparse.Namespace) -> BenchSettings:
    settings = BenchSettings(
        steps=args.steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
        micro_batch=args.micro_batch, max_completion_length=args.max_completion_length, temperature=1.0,
        lr=args.lr, beta=args.beta, seed=0,
    )  # fmt: skip
    if settings.completions_per_step % settings.micro_batch:
        raise SystemExit("prompts-per-step x group-size must be a multiple of --micro-batch")
    if settings.beta <= 0:
        raise SystemExit("--beta must be > 0 (the *_beta0 contenders cover beta 0)")
    return settings


def benchmark(args: argparse.Namespace, model_dir: Path) -> None:
    """Alternate the contenders ``--repeats`` times; print the table and write the JSON."""
    settings = settings_from(args)
    runs: list[RunResult] = []
    discarded: list[RunResult] = []
    for i in range(args.repeats):
        for contender in CONTENDERS if i % 2 == 0 else CONTENDERS[::-1]:
            r = run_quiet(contender, model_dir, settings, args, discarded)
            runs.append(r)
            print(
                f"[{i + 1}/{args.repeats}] {contender:11} {r.completions_per_second:6.1f} compl/s "
                f"{r.tokens_per_second:6.0f} tok/s loop {r.seconds:6.2f} s (gen {r.generation_s:5.2f} "
                f"reward {r.reward_s:4.2f} scoring {r.scoring_s:5.2f} update {r.update_s:5.2f} other "
                f"{r.other_s:5.2f})  len {r.mean_completion_length:4.1f}  reward {r.mean_reward:.3f}  "
                f"peak {r.peak_rss_mib:5.0f} MiB  background {r.background_cores:.2f} cores",
                flush=True,
            )
    summary = summarize(runs)
    print()
    print_table(summary)
    header = {
        "settings": {
            **asdict(settings),
            "completions_per_step": settings.completions_per_step,
            "n_prompts": settings.n_prompts,
            "loss_aggregation": "token (TRL loss_type='dapo')",
        }
    }
    write_report(args.out, header, VERSION_PACKAGES, summary, runs, discarded)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="Runs per contender.")
    p.add_argument("--steps", type=int, default=30, help="Optimizer steps = rollouts (timed).")
    p.add_argument("--prompts-per-step", type=int, default=16, help="Prompts per rollout (P).")
    p.add_argument("--group-size", type=int, default=8, help="Completions per prompt (G).")
    p.add_argument("--micro-batch", type=int, default=64, help="Completions per forward/backward pass.")
    p.add_argument("--max-completion-length", type=int, default=24, help="New tokens per completion at most.")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient of ours_beta and trl_beta.")
    p.add_argument("--policy-dir", type=Path, help="Reuse a policy saved by sft_policy.save_sft_policy.")
    workers.add_measurement_options(p, "grpo_throughput.json", CONTENDERS)
    return p.parse_args()


if __name__ == "__main__":
    cli = parse_args()
    if cli.worker:
        worker_main(cli)
    else:
        run_with_policy(cli, benchmark)
