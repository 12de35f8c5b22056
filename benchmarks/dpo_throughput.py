"""Side-by-side DPO training throughput: our ``direct_alignment`` training against TRL's ``DPOTrainer``.

All contenders start from the same saved, briefly SFT-trained tiny Llama (``sft_policy.py``), train with the
sigmoid DPO loss (beta 0.1) on the same preference pairs, with the same token ids, batch, steps, optimizer
and seed, fp32 on CPU, no gradient checkpointing. Three contenders:

- ours: the ``direct_alignment`` stage's work with its defaults (``tokenize_preference_rows``, then
  ``cached_reference_logprobs``: one no-grad pass of the reference, which by default is the policy's own
  starting weights, so the stage scores with the policy before training and loads no second copy; the
  log-probs are written to a fresh cache file; then ``train_direct_alignment``). Each pair is one row holding
  its prompt once, then the chosen and the rejected completion (``shared_prefix: true``).
- ours_padded: the same with ``shared_prefix: false``: each sequence its own right-padded row, as TRL does
  (shows what the shared prefix is worth).
- trl: ``DPOTrainer`` as users run it: ``ref_model`` loaded from the same directory and passed explicitly,
  ``precompute_ref_log_probs`` at its default (False), so the reference runs a forward pass every step.
- trl_precompute: ``DPOTrainer`` with ``precompute_ref_log_probs=True`` (one pass before training, with
  the policy's own starting weights as reference: no ``ref_model`` is kept), the fairer second comparison.

Same token ids: TRL gets the same rows as text: the prompt rendered with the chat template and its
generation header, each completion as the rest of the rendered chat up to its end-of-turn token (what our
tokenization splits off). TRL tokenizes them itself; the worker asserts, pair by pair, that TRL's
``prompt_ids``/``chosen_ids``/``rejected_ids`` equal ours. The number of training pairs is steps x batch x
grad_accum / epochs, so every contender trains on every pair exactly ``epochs`` times and all count the same
real tokens (asserted in the summary).

Measured per run, each in a fresh subprocess (contenders alternate, the order flips every repeat):
- tokens/s = real tokens (non-padding prompt + completion tokens of the chosen and the rejected sequence of
  every pair trained on) / seconds of the training loop. Ours: ``input_tokens`` and ``seconds`` of
  ``train_direct_alignment`` (its loop only). TRL: the sum of ``attention_mask`` of every micro-batch passed
  to ``training_step``, over the time between the ``on_train_begin`` and ``on_train_end`` callbacks.
- reference s = the one-off reference pass. Ours: the whole ``cached_reference_logprobs`` call (the pass
  and writing the cache file). trl_precompute: TRL's ``_precompute_ref_logps``.
  trl: 0 (its reference forward passes are inside the training loop).
- tokens/s incl. reference = the same tokens / (loop seconds + reference seconds).
- peak RSS = ``ru_maxrss`` of the subprocess after training (it includes the reference pass).

    .venv/bin/python benchmarks/dpo_throughput.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import workers
from machine_load import BackgroundMeter
from report import ratios, write_report
from sft_policy import POLICY_TASK, run_with_policy
from sft_throughput import VERSION_PACKAGES, current_rss_mib, peak_rss_mib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")

CONTENDERS = ("ours", "ours_padded", "trl", "trl_precompute")
OURS = ("ours", "ours_padded")
TARGET_SPEEDUP = 1.5  # ours >= 1.5x TRL tokens/s at no more peak memory
MEDIAN_FIELDS = (
    "tokens_per_second",
    "tokens_per_second_with_reference",
    "seconds",
    "reference_seconds",
    "tokens",
    "peak_rss_mib",
    "rss_before_mib",
    "mean_loss",
)


@dataclass
class BenchSettings:
    """Settings shared by every contender (one source of truth, passed to every worker)."""

    steps: int
    pairs_per_batch: int
    grad_accum: int
    epochs: int  # passes over the training pairs: n_pairs = steps * pairs_per_batch * grad_accum / epochs
    lr: float
    warmup_ratio: float
    beta: float
    max_length: int
    seed: int

    @property
    def n_pairs(self) -> int:
        return self.steps * self.pairs_per_batch * self.grad_accum // self.epochs


@dataclass
class RunResult:
    contender: str
    tokens: int
    seconds: float
    tokens_per_second: float
    reference_seconds: float
    tokens_per_second_with_reference: float
    peak_rss_mib: float
    rss_before_mib: float  # models loaded, pairs tokenized, before the first forward pass
    mean_loss: float  # mean training loss over the optimizer steps (both should train the same thing)
    pairs: int
    torch_threads: int
    background_cores: float  # CPU used by other processes during the reference pass and the loop


# ----------------------------------------------------------------------------------------------- workers


def preference_rows(s: BenchSettings) -> list[dict]:
    from rlhf_core.data.synthetic import synthetic_records

    return synthetic_records("arithmetic", "preference", n=s.n_pairs, seed=s.seed, **POLICY_TASK)


def our_pairs(tokenizer, s: BenchSettings):
    """(x, y_c, y_r) token ids as the stage tokenizes them; no pair may be cut or dropped."""
    from rlhf_core.modeling.preference_tokens import tokenize_preference_rows

    pairs, _ = tokenize_preference_rows(
        preference_rows(s), tokenizer, max_length=s.max_length, on_overlong="fail"
    )
    return pairs


def dpo_stage(s: BenchSettings, shared_prefix: bool):
    from rlhf_core.spec.stages.direct_alignment import DirectAlignmentStage

    train = {
        "max_steps": s.steps,
        "lr": s.lr,
        "weight_decay": 0.0,
        "batch_size": s.pairs_per_batch,
        "grad_accum": s.grad_accum,
        "warmup_ratio": s.warmup_ratio,
        "schedule": "linear",
        "max_grad_norm": 1.0,
        "max_length": s.max_length,
        "on_overlong": "fail",
        "shared_prefix": shared_prefix,
        "precision": "fp32",
        "checkpoint_every": s.steps,  # no checkpoint inside the timed loop
        "log_every": 1,  # per-step loss for the mean; the log function only appends to a list
    }
    return DirectAlignmentStage(
        kind="direct_alignment",
        policy="policy",
        data="prefs.preferences",
        loss="dpo",
        beta=s.beta,
        train=train,
    )


def run_ours(model_dir: Path, s: BenchSettings, shared_prefix: bool) -> RunResult:
    """The stage's steps: tokenize, one reference pass (the policy at its starting weights, as the stage does
    when no other reference is given) into a fresh cache file, train."""
    import torch

    from rlhf_core.modeling.models import load_model
    from rlhf_core.training.direct_alignment.reference import cached_reference_logprobs
    from rlhf_core.training.direct_alignment.trainer import train_direct_alignment

    model, tokenizer = load_model(str(model_dir))
    pairs = our_pairs(tokenizer, s)
    stage = dpo_stage(s, shared_prefix)
    losses: list[float] = []
    rss_before = current_rss_mib()
    meter = BackgroundMeter().start()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        reference, from_cache = cached_reference_logprobs(
            Path(tmp) / "reference.pt", lambda: (model, tokenizer.pad_token_id), None, pairs, shared_prefix
        )
        reference_seconds = time.perf_counter() - started
        assert not from_cache, "the reference pass must run, not come from a cache"
        _, loop = train_direct_alignment(
            model, tokenizer, pairs, reference, stage, seed=s.seed, checkpoint_dir=Path(tmp) / "ckpt",
            log=lambda metrics, step: losses.append(metrics["train/loss"]),
        )  # fmt: skip
    background, peak = meter.stop(), peak_rss_mib()
    tokens, seconds = loop["input_tokens"], loop["seconds"]
    return RunResult(
        "ours" if shared_prefix else "ours_padded", tokens, seconds, tokens / seconds, reference_seconds,
        tokens / (seconds + reference_seconds), peak, rss_before, statistics.fmean(losses), len(pairs),
        torch.get_num_threads(), background,
    )  # fmt: skip


def trl_text_rows(tokenizer, rows: list[dict]) -> list[dict]:
    """The rows as TRL's standard (text) format, split where our tokenization splits them: the prompt with
    its generation header, each completion up to and including its end-of-turn token."""

    def split(prompt: list[dict], completion: str) -> tuple[str, str]:
        x = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": completion}], tokenize=False
        )
        assert full.startswith(x)
        return x, full[len(x) :].rstrip()

    out = []
    for row in rows:
        prompt = [{"role": "user", "content": row["prompt"]}]
        (x, y_c), (_, y_r) = split(prompt, row["chosen"]), split(prompt, row["rejected"])
        out.append({"prompt": x, "chosen": y_c, "rejected": y_r})
    return out


def check_same_ids(dataset, pairs) -> None:
    """TRL's tokenized pairs must be ours, id for id, in the same order."""
    columns = {name: dataset[name] for name in ("prompt_ids", "chosen_ids", "rejected_ids")}
    assert len(columns["prompt_ids"]) == len(pairs), (len(columns["prompt_ids"]), len(pairs))
    for i, p in enumerate(pairs):
        theirs = tuple(list(columns[name][i]) for name in ("prompt_ids", "chosen_ids", "rejected_ids"))
        if theirs != (p.prompt, p.chosen, p.rejected):
            raise AssertionError(f"pair {i}: TRL tokenized {theirs}, ours {(p.prompt, p.chosen, p.rejected)}")


def trl_config(s: BenchSettings, out_dir: str, precompute: bool):
    """DPOConfig with every default that differs from ours set explicitly."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=out_dir,
        seed=s.seed,
        data_seed=s.seed,
        use_cpu=True,
        max_steps=s.steps,
        per_device_train_batch_size=s.pairs_per_batch,
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.lr,  # TRL's DPO default is 1e-6
        weight_decay=0.0,
        optim="adamw_torch",
        lr_scheduler_type="linear",
        warmup_steps=math.ceil(s.warmup_ratio * s.steps),
        max_grad_norm=1.0,
        bf16=False,  # TRL's default is True, even on CPU
        fp16=False,
        activation_checkpointing=False,  # TRL's default (gradient_checkpointing) is True
        beta=s.beta,
        loss_type=["sigmoid"],
        max_length=s.max_length,
        precompute_ref_log_probs=precompute,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        torch_compile=False,
    )


def run_trl(model_dir: Path, s: BenchSettings, precompute: bool) -> RunResult:
    """TRL's DPOTrainer on the same pairs; with ``precompute`` its one-off reference pass is timed."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOTrainer

    from rlhf_core.modeling.models import load_model

    os.environ.setdefault("TQDM_DISABLE", "1")  # the precompute pass's progress bar ignores disable_tqdm
    probe: dict[str, float] = {}

    def first_forward_begins() -> None:  # the reference pass (precompute) or the training loop
        if "meter" not in probe:
            probe["rss_before"], probe["meter"] = current_rss_mib(), BackgroundMeter().start()

    class LoopTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            first_forward_begins()
            probe["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            probe["end"], probe["background"] = time.perf_counter(), probe["meter"].stop()

    class MeasuredDPOTrainer(DPOTrainer):
        input_tokens = 0
        reference_seconds = 0.0

        def _precompute_ref_logps(self, dataset, name, batch_size):
            first_forward_begins()
            started = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            self.reference_seconds += time.perf_counter() - started
            return out

        def training_step(self, model, inputs, *args, **kwargs):
            self.input_tokens += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *args, **kwargs)

    model, tokenizer = load_model(str(model_dir))
    # without precompute the reference must be given, or TRL rebuilds it from the config's model name
    ref_model = None if precompute else load_model(str(model_dir))[0]
    out_dir = tempfile.mkdtemp(prefix="trl-dpo-bench-")
    trainer = MeasuredDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=trl_config(s, out_dir, precompute),
        train_dataset=Dataset.from_list(trl_text_rows(tokenizer, preference_rows(s))),
        processing_class=tokenizer,
        callbacks=[LoopTimer()],
    )
    assert not trainer.args.gradient_checkpointing and not trainer.model.is_activation_checkpointing
    assert precompute == (trainer.reference_seconds > 0) and (trainer.ref_model is None) == precompute
    check_same_ids(trainer.train_dataset, our_pairs(tokenizer, s))
    output = trainer.train()
    peak = peak_rss_mib()
    shutil.rmtree(out_dir, ignore_errors=True)
    tokens, seconds = trainer.input_tokens, probe["end"] - probe["start"]
    reference_seconds = trainer.reference_seconds
    return RunResult(
        "trl_precompute" if precompute else "trl", tokens, seconds, tokens / seconds, reference_seconds,
        tokens / (seconds + reference_seconds), peak, probe["rss_before"], float(output.training_loss),
        len(trainer.train_dataset), torch.get_num_threads(), probe["background"],
    )  # fmt: skip


def worker_main(args: argparse.Namespace) -> None:
    settings = BenchSettings(**json.loads(args.settings))
    model_dir = Path(args.model_dir)
    if args.worker in OURS:
        result = run_ours(model_dir, settings, shared_prefix=args.worker == "ours")
    else:
        result = run_trl(model_dir, settings, precompute=args.worker == "trl_precompute")
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
        summary[c]["min_tokens_per_second"] = min(r.tokens_per_second for r in rs)
        summary[c]["max_tokens_per_second"] = max(r.tokens_per_second for r in rs)
        summary[c]["max_background_cores"] = max(r.background_cores for r in rs)
        summary[c]["repeats"] = len(rs)
    summary["same_real_tokens_in_every_run"] = len({r.tokens for r in runs}) == 1
    for other in ("trl", "trl_precompute", "ours_padded"):
        vs = {
            "training": ratios(by["ours"], by[other], "tokens_per_second"),
            "with_reference": ratios(by["ours"], by[other], "tokens_per_second_with_reference"),
            "peak_rss": ratios(by["ours"], by[other], "peak_rss_mib"),
        }
        for measure in ("training", "with_reference"):
            vs[f"target_met_{measure}"] = (
                vs[measure]["ratio_of_medians"] >= TARGET_SPEEDUP
                and vs["peak_rss"]["ratio_of_medians"] <= 1.0
            )
        summary[f"ours_vs_{other}"] = vs
    return summary


def print_table(s: dict) -> None:
    header = (
        f"{'contender':15} {'tok/s':>7} {'(min-max)':>13} {'ref s':>6} {'loop s':>7} {'tok/s+ref':>9} "
        f"{'tokens':>7} {'peak RSS':>8} {'RSS before':>10} {'mean loss':>9}"
    )
    print(header)
    for c in CONTENDERS:
        m = s[c]
        spread = f"{m['min_tokens_per_second']:.0f}-{m['max_tokens_per_second']:.0f}"
        print(
            f"{c:15} {m['median_tokens_per_second']:7.0f} {spread:>13} {m['median_reference_seconds']:6.2f} "
            f"{m['median_seconds']:7.2f} {m['median_tokens_per_second_with_reference']:9.0f} "
            f"{m['median_tokens']:7.0f} {m['median_peak_rss_mib']:8.0f} {m['median_rss_before_mib']:10.0f} "
            f"{m['median_mean_loss']:9.4f}"
        )
    print(f"same real tokens in every run: {s['same_real_tokens_in_every_run']}")
    for other in ("trl", "trl_precompute", "ours_padded"):
        v = s[f"ours_vs_{other}"]
        print(
            f"ours/{other}: training x{v['training']['ratio_of_medians']:.2f} "
            f"(per-repeat median x{v['training']['median_of_per_repeat']:.2f}), with reference pass "
            f"x{v['with_reference']['ratio_of_medians']:.2f} "
            f"(x{v['with_reference']['median_of_per_repeat']:.2f}), peak RSS "
            f"x{v['peak_rss']['ratio_of_medians']:.2f} -> target (>= {TARGET_SPEEDUP}x, <= 1.0x RSS): "
            f"training {'MET' if v['target_met_training'] else 'NOT MET'}, with reference "
            f"{'MET' if v['target_met_with_reference'] else 'NOT MET'}"
        )


def settings_from(args: argparse.Namespace) -> BenchSettings:
    settings = BenchSettings(
        steps=args.steps, pairs_per_batch=args.pairs_per_batch, grad_accum=args.grad_accum,
        epochs=args.epochs, lr=args.lr, warmup_ratio=0.1, beta=0.1, max_length=args.max_length, seed=0,
    )  # fmt: skip
    if (args.steps * args.pairs_per_batch * args.grad_accum) % args.epochs:
        raise SystemExit("steps x pairs-per-batch x grad-accum must be a multiple of --epochs (whole epochs)")
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
                f"[{i + 1}/{args.repeats}] {contender:15} {r.tokens_per_second:7.0f} tok/s {r.tokens:7d} tok "
                f"loop {r.seconds:6.2f} s ref {r.reference_seconds:5.2f} s  peak {r.peak_rss_mib:5.0f} MiB  "
                f"mean loss {r.mean_loss:.4f}  background {r.background_cores:.2f} cores",
                flush=True,
            )
    summary = summarize(runs)
    print()
    print_table(summary)
    header = {"settings": {**asdict(settings), "n_pairs": settings.n_pairs}}
    write_report(args.out, header, VERSION_PACKAGES, summary, runs, discarded)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="Runs per contender.")
    p.add_argument("--steps", type=int, default=80, help="Optimizer steps (timed).")
    p.add_argument("--pairs-per-batch", type=int, default=8, help="Preference pairs per micro-batch.")
    p.add_argument("--grad-accum", type=int, default=2, help="Micro-batches per optimizer step.")
    p.add_argument("--epochs", type=int, default=2, help="Passes over the pairs (sets the number of pairs).")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=128, help="Longest prompt + completion, in tokens.")
    p.add_argument("--policy-dir", type=Path, help="Reuse a policy saved by sft_policy.save_sft_policy.")
    workers.add_measurement_options(p, "dpo_throughput.json", CONTENDERS)
    return p.parse_args()


if __name__ == "__main__":
    cli = parse_args()
    if cli.worker:
        worker_main(cli)
    else:
        run_with_policy(cli, benchmark)
