"""Side-by-side reward-model training throughput: our ``train_reward_model`` against TRL's ``RewardTrainer``.

Both contenders start from the same saved, briefly SFT-trained tiny Llama (``sft_policy.py``) loaded as a
one-label sequence classifier, and train a Bradley-Terry reward model on the same token ids: every
(prompt, completion) is rendered with the chat template, trailing whitespace stripped, and scored at its
last token (``<|im_end|>``). TRL gets the pre-tokenized pairs (``chosen_ids``/``rejected_ids`` from our
``encode_completion``), so the two see identical sequences. Prompts are de-duplicated (one pair per
prompt), so "prompts per micro-batch" (ours) equals "pairs per micro-batch" (TRL).

Measured per run, each in a fresh subprocess (contenders alternate, the order flips every repeat):
- tokens/s = tokens of the chosen and rejected sequences of the pairs trained on (each counted in full,
  padding excluded) / seconds of the training loop: pairs per second times the mean pair length, in
  the same unit for every contender. TRL and ``ours_padded`` feed exactly these tokens; ``ours`` holds
  each prompt once per row (shared prefix), so it feeds fewer for the same pairs, loss and gradients.
- peak RSS = ``ru_maxrss`` of the subprocess, read right after training (before evaluation).
- held-out accuracy = ``evaluate_reward_model`` on the same held-out prompts, for both trained models.

    .venv/bin/python benchmarks/reward_model_throughput.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import workers
from machine_load import BackgroundMeter
from report import write_report
from sft_policy import POLICY_TASK, run_with_policy
from sft_throughput import VERSION_PACKAGES, current_rss_mib, peak_rss_mib

# "ours" is the default (shared-prefix rows); "ours_padded" (shared_prefix: false, one right-padded row
# per sequence, the same layout as TRL) shows how much of the difference the shared prefix makes.
CONTENDERS = ("ours", "ours_padded", "trl")
TARGET_SPEEDUP = 1.3  # ours >= 1.3x TRL tokens/s at no more peak memory, same held-out accuracy


@dataclass
class BenchSettings:
    steps: int
    pairs_per_batch: int
    grad_accum: int
    lr: float
    warmup_ratio: float
    n_records: int
    held_out_prompts: int
    seed: int  # the data (problems, pairs, held-out split)
    train_seed: int = 0  # shuffling of the training pairs (both contenders)


@dataclass
class RunResult:
    contender: str
    tokens: int
    seconds: float
    tokens_per_second: float
    peak_rss_mib: float
    rss_before_train_mib: float
    held_out_accuracy: float
    held_out_loss: float
    held_out_pairs: int
    train_pairs: int
    background_cores: float


# ----------------------------------------------------------------------------------------------- workers


def split_records(s: BenchSettings) -> tuple[list[dict], list[dict]]:
    """One pair per distinct prompt; the last ``held_out_prompts`` prompts are held out."""
    from rlhf_core.data.synthetic import synthetic_records

    unique: dict[str, dict] = {}
    for row in synthetic_records("arithmetic", "preference", n=s.n_records, seed=s.seed, **POLICY_TASK):
        unique.setdefault(row["prompt"], row)
    rows = list(unique.values())
    return rows[: -s.held_out_prompts], rows[-s.held_out_prompts :]


def train_spec(s: BenchSettings, shared_prefix: bool = True):
    from rlhf_core.spec import RewardTrainSpec

    return RewardTrainSpec(
        max_steps=s.steps,
        lr=s.lr,
        weight_decay=0.0,
        batch_size=s.pairs_per_batch,
        grad_accum=s.grad_accum,
        warmup_ratio=s.warmup_ratio,
        schedule="linear",
        max_grad_norm=1.0,
        max_length=128,
        checkpoint_every=s.steps,  # no checkpoint inside the timed loop
        log_every=s.steps,
        shared_prefix=shared_prefix,
    )


def held_out(model, tokenizer, rows: list[dict], s: BenchSettings) -> dict[str, float]:
    from rlhf_core.evaluation.reward_model import evaluate_reward_model

    return evaluate_reward_model(model, tokenizer, rows, train_spec(s))


def run_ours(model_dir: Path, s: BenchSettings, shared_prefix: bool = True) -> RunResult:
    from transformers import AutoTokenizer

    from rlhf_core.modeling.reward_model import build_reward_model
    from rlhf_core.training.reward_model.trainer import train_reward_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = build_reward_model(str(model_dir))
    train, test = split_records(s)
    rss_before = current_rss_mib()
    meter = BackgroundMeter().start()  # also spans tokenization, done before the timed loop
    with tempfile.TemporaryDirectory() as ckpt:
        model, result = train_reward_model(
            model,
            tokenizer,
            train,
            train_spec(s, shared_prefix),
            seed=s.train_seed,
            checkpoint_dir=Path(ckpt),
        )
    background, peak = meter.stop(), peak_rss_mib()
    ev = held_out(model, tokenizer, test, s)
    return RunResult(
        "ours" if shared_prefix else "ours_padded", result.input_tokens, result.seconds,
        result.tokens_per_second, peak, rss_before,
        ev["eval/accuracy"], ev["eval/loss"], int(ev["eval/pairs"]), result.pairs, background,
    )  # fmt: skip


def run_trl(model_dir: Path, s: BenchSettings) -> RunResult:
    """TRL's RewardTrainer on our token ids, every default that differs from ours set explicitly."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from rlhf_core.modeling.preference_tokens import encode_completion

    timer: dict[str, float] = {}

    class LoopTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            timer["meter"], timer["start"] = BackgroundMeter().start(), time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            timer["end"], timer["background"] = time.perf_counter(), timer["meter"].stop()

    class CountingRewardTrainer(RewardTrainer):
        input_tokens = 0

        def training_step(self, model, inputs, *args, **kwargs):
            self.input_tokens += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *args, **kwargs)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    torch.nn.init.zeros_(model.score.weight)  # same zero-initialised head as build_reward_model
    train, test = split_records(s)
    rows = [
        {
            "chosen_ids": encode_completion(tokenizer, r["prompt"], r["chosen"]),
            "rejected_ids": encode_completion(tokenizer, r["prompt"], r["rejected"]),
        }
        for r in train
    ]
    out_dir = tempfile.mkdtemp(prefix="trl-rm-bench-")
    args = RewardConfig(
        output_dir=out_dir,
        seed=s.train_seed,
        data_seed=s.train_seed,
        use_cpu=True,
        max_steps=s.steps,
        per_device_train_batch_size=s.pairs_per_batch,
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.lr,
        weight_decay=0.0,
        optim="adamw_torch",
        lr_scheduler_type="linear",
        warmup_steps=math.ceil(s.warmup_ratio * s.steps),
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        max_length=128,
        center_rewards_coefficient=None,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        torch_compile=False,
    )
    trainer = CountingRewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[LoopTimer()],
    )
    rss_before = current_rss_mib()
    trainer.train()
    peak = peak_rss_mib()
    shutil.rmtree(out_dir, ignore_errors=True)
    seconds = timer["end"] - timer["start"]
    ev = held_out(trainer.model, tokenizer, test, s)
    return RunResult(
        "trl", trainer.input_tokens, seconds, trainer.input_tokens / seconds, peak, rss_before,
        ev["eval/accuracy"], ev["eval/loss"], int(ev["eval/pairs"]), len(rows), timer["background"],
    )  # fmt: skip


def worker_main(args: argparse.Namespace) -> None:
    settings = BenchSettings(**json.loads(args.settings))
    model_dir = Path(args.model_dir)
    if args.worker == "trl":
        result = run_trl(model_dir, settings)
    else:
        result = run_ours(model_dir, settings, shared_prefix=args.worker == "ours")
    workers.emit_result(result)


# ----------------------------------------------------------------------------------------------- driver


def run_worker(contender: str, model_dir: Path, settings: BenchSettings) -> RunResult:
    return workers.run_contender(__file__, RunResult, contender, model_dir, settings)


def run_quiet(contender: str, model_dir: Path, settings: BenchSettings, args, discarded: list) -> RunResult:
    return workers.run_contender_quietly(__file__, RunResult, contender, model_dir, settings, args, discarded)


def summarize(runs: list[RunResult]) -> dict:
    per: dict = {}
    for c in CONTENDERS:
        rs = [r for r in runs if r.contender == c]
        per[c] = {
            f"median_{f}": statistics.median(getattr(r, f) for r in rs)
            for f in ("tokens_per_second", "peak_rss_mib", "rss_before_train_mib", "seconds", "tokens",
                      "held_out_accuracy", "held_out_loss")
        }  # fmt: skip
        per[c]["min_tokens_per_second"] = min(r.tokens_per_second for r in rs)
        per[c]["max_tokens_per_second"] = max(r.tokens_per_second for r in rs)
        per[c]["held_out_accuracies"] = [r.held_out_accuracy for r in rs]
        per[c]["max_background_cores"] = max(r.background_cores for r in rs)
        per[c]["repeats"] = len(rs)
    ours = [r for r in runs if r.contender == "ours"]
    trl = [r for r in runs if r.contender == "trl"]
    paired = [o.tokens_per_second / t.tokens_per_second for o, t in zip(ours, trl, strict=True)]
    per["speedup_ours_over_trl"] = (
        per["ours"]["median_tokens_per_second"] / per["trl"]["median_tokens_per_second"]
    )
    per["speedup_per_repeat"] = paired
    per["speedup_median_of_per_repeat"] = statistics.median(paired)
    per["peak_rss_ratio_ours_over_trl"] = (
        per["ours"]["median_peak_rss_mib"] / per["trl"]["median_peak_rss_mib"]
    )
    per["speedup_ours_padded_over_trl"] = (
        per["ours_padded"]["median_tokens_per_second"] / per["trl"]["median_tokens_per_second"]
    )
    per["speed_and_memory_target_met"] = (
        per["speedup_ours_over_trl"] >= TARGET_SPEEDUP and per["peak_rss_ratio_ours_over_trl"] <= 1.0
    )
    return per


def print_table(s: dict) -> None:
    print(f"{'contender':11} {'tok/s median':>12} {'(min-max)':>13} {'peak RSS':>9} {'RSS before':>10} "
          f"{'loop s':>7} {'tokens':>7} {'held-out acc':>12}")  # fmt: skip
    for c in CONTENDERS:
        m = s[c]
        spread = f"{m['min_tokens_per_second']:.0f}-{m['max_tokens_per_second']:.0f}"
        print(
            f"{c:11} {m['median_tokens_per_second']:12.0f} {spread:>13} {m['median_peak_rss_mib']:9.0f} "
            f"{m['median_rss_before_train_mib']:10.0f} {m['median_seconds']:7.2f} {m['median_tokens']:7.0f} "
            f"{m['median_held_out_accuracy']:12.3f}"
        )
    print(
        f"ours/TRL speed x{s['speedup_ours_over_trl']:.2f} (per-repeat median "
        f"x{s['speedup_median_of_per_repeat']:.2f}), peak RSS x{s['peak_rss_ratio_ours_over_trl']:.2f} -> "
        f"speed/memory target {'MET' if s['speed_and_memory_target_met'] else 'NOT MET'}; "
        f"ours_padded/TRL x{s['speedup_ours_padded_over_trl']:.2f}"
    )


def benchmark(args: argparse.Namespace, model_dir: Path) -> None:
    settings = BenchSettings(
        steps=args.steps, pairs_per_batch=args.pairs_per_batch, grad_accum=args.grad_accum, lr=args.lr,
        warmup_ratio=0.1, n_records=args.n_records, held_out_prompts=args.held_out_prompts, seed=0,
    )  # fmt: skip
    runs: list[RunResult] = []
    discarded: list[RunResult] = []
    for i in range(args.repeats):
        for contender in CONTENDERS if i % 2 == 0 else CONTENDERS[::-1]:
            r = run_quiet(contender, model_dir, settings, args, discarded)
            runs.append(r)
            print(
                f"[{i + 1}/{args.repeats}] {contender:11} {r.tokens_per_second:8.0f} tok/s {r.tokens:7d} tok "
                f"{r.seconds:6.2f} s  peak {r.peak_rss_mib:5.0f} MiB  held-out acc {r.held_out_accuracy:.3f} "
                f"({r.held_out_pairs} pairs)  background {r.background_cores:.2f} cores",
                flush=True,
            )
    summary = summarize(runs)
    if args.accuracy_seeds:
        summary["held_out_accuracy_by_train_seed"] = accuracy_spread(args, model_dir, settings)
    print()
    print_table(summary)
    write_report(args.out, {"settings": asdict(settings)}, VERSION_PACKAGES, summary, runs, discarded)


def accuracy_spread(args: argparse.Namespace, model_dir: Path, settings: BenchSettings) -> dict:
    """Held-out accuracy of ours and TRL over training seeds 1..K (same data): the noise to compare to."""
    spread: dict[str, dict[int, float]] = {"ours": {}, "trl": {}}
    for seed in range(1, args.accuracy_seeds + 1):
        for contender in spread:
            result = run_worker(
                contender, model_dir, BenchSettings(**{**asdict(settings), "train_seed": seed})
            )
            spread[contender][seed] = result.held_out_accuracy
            print(f"train seed {seed}: {contender:4} held-out acc {result.held_out_accuracy:.3f}", flush=True)
    return spread


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="Runs per contender.")
    p.add_argument("--steps", type=int, default=80, help="Optimizer steps (timed).")
    p.add_argument("--pairs-per-batch", type=int, default=8, help="Preference pairs per micro-batch.")
    p.add_argument("--grad-accum", type=int, default=2, help="Micro-batches per optimizer step.")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--n-records", type=int, default=3000, help="Preference rows drawn (then one per prompt).")
    p.add_argument("--held-out-prompts", type=int, default=200, help="Prompts kept out of training.")
    p.add_argument(
        "--accuracy-seeds",
        type=int,
        default=4,
        help="Extra untimed runs per contender with training seeds 1..K.",
    )
    p.add_argument("--policy-dir", type=Path, help="Reuse a policy saved by sft_policy.save_sft_policy.")
    workers.add_measurement_options(p, "reward_model_throughput.json", CONTENDERS)
    return p.parse_args()


if __name__ == "__main__":
    cli = parse_args()
    if cli.worker:
        worker_main(cli)
    else:
        run_with_policy(cli, benchmark)
