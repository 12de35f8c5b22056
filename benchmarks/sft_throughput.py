"""Side-by-side SFT throughput: our ``train_sft`` against TRL's ``SFTTrainer``.

Both contenders train the same saved tiny Llama (hidden 128, 2 layers, 4 heads, vocab 512) on the same
synthetic arithmetic conversations, with the same batch settings, fp32 on CPU, AdamW, linear schedule,
no gradient checkpointing. Each run is a fresh subprocess (so peak RSS is its own), contenders alternate,
and the order flips every repeat. We report medians over repeats and the ours/TRL ratio.

Measured per run:
- tokens/s = non-padding input tokens fed to the model / seconds of the training loop. The loop is
  timed from just before the first step to just after the last (ours: ``SFTResult.seconds``; TRL: the
  ``on_train_begin``/``on_train_end`` callbacks), so model loading and tokenization are excluded.
- peak RSS = ``ru_maxrss`` of the subprocess (whole process: imports, model, data, training).
- background cores = CPU other processes used during the timed loop. The box is shared, so each run
  starts only once the CPUs are idle, and a run that others disturbed is redone (kept as discarded).

Loss masking: TRL's ``assistant_only_loss`` needs ``{% generation %}`` markers that our ChatML template
lacks (TRL raises), so TRL gets the same conversations as prompt/completion pairs with
``completion_only_loss=True``, which masks the prompt just as our ``all_assistant`` mask does for
single-turn chats.

    .venv/bin/python benchmarks/sft_throughput.py --repeats 5     # table + results/sft_throughput.json
    .venv/bin/python benchmarks/sft_throughput.py --profile       # torch op tables per contender/mode
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import workers
from machine_load import BackgroundMeter
from report import write_report

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")

CONTENDERS = ("ours", "trl")
MODES = ("packed", "unpacked")
TARGET_SPEEDUP = 1.3  # the project's target: ours >= 1.3x TRL tokens/s at no more peak memory
MEDIAN_FIELDS = (
    "tokens_per_second",
    "peak_rss_mib",
    "rss_before_train_mib",
    "seconds",
    "tokens",
    "mean_loss",
)


VERSION_PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets")


@dataclass
class BenchSettings:
    """Settings shared by both contenders (one source of truth, passed to every worker)."""

    steps: int
    batch_size: int
    grad_accum: int
    max_length: int
    lr: float
    warmup_ratio: float
    n_records: int
    seed: int


@dataclass
class RunResult:
    contender: str
    mode: str
    tokens: int
    seconds: float
    tokens_per_second: float
    peak_rss_mib: float
    rss_before_train_mib: float
    mean_loss: float  # mean training loss over the optimizer steps (a sanity check that both learn)
    torch_threads: int
    background_cores: float  # CPU used by other processes during the timed loop


# ----------------------------------------------------------------------------------------------- workers


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def load_records(s: BenchSettings) -> list[dict]:
    from rlhf_core.data.synthetic import synthetic_records

    return synthetic_records("arithmetic", "sft", n=s.n_records, seed=s.seed)


class LoopProbe:
    """Wraps the timed training loop: CPU used by other processes, and optionally a torch profile."""

    def __init__(self, profile_out: Path | None):
        self.profile_out, self.background_cores, self._profiler = profile_out, 0.0, None

    def start(self) -> None:
        import torch

        if self.profile_out is not None:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profiler.start()
        self._meter = BackgroundMeter().start()

    def stop(self) -> None:
        self.background_cores = self._meter.stop()
        if self._profiler is not None:
            self._profiler.stop()
            table = self._profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            self.profile_out.write_text(table)


def run_ours(model_dir: Path, s: BenchSettings, packed: bool, probe: LoopProbe) -> RunResult:
    """Our trainer; ``SFTResult`` already counts non-pad input tokens and times the loop only."""
    import torch

    from rlhf_core.modeling.models import load_model
    from rlhf_core.spec import SFTTrainSpec
    from rlhf_core.training.sft.trainer import train_sft

    model, tokenizer = load_model(str(model_dir))
    cfg = SFTTrainSpec(
        max_steps=s.steps,
        lr=s.lr,
        weight_decay=0.0,
        batch_size=s.batch_size,
        grad_accum=s.grad_accum,
        warmup_ratio=s.warmup_ratio,
        schedule="linear",
        max_grad_norm=1.0,
        max_length=s.max_length,
        packing=packed,
        mask="all_assistant",
        checkpoint_every=s.steps,  # no checkpoint inside the timed loop
        log_every=1,  # per-step loss for the mean; the log function only appends to a list
    )
    records = load_records(s)
    losses: list[float] = []
    rss_before = current_rss_mib()
    probe.start()  # also spans tokenization (~1 s), which train_sft does before its timed loop
    with tempfile.TemporaryDirectory() as ckpt:
        _, result = train_sft(
            model,
            tokenizer,
            records,
            cfg,
            seed=s.seed,
            checkpoint_dir=Path(ckpt),
            log=lambda metrics, step: losses.append(metrics["train/loss"]),
        )
    probe.stop()
    return RunResult(
        "ours",
        "packed" if packed else "unpacked",
        result.input_tokens,
        result.seconds,
        result.tokens_per_second,
        peak_rss_mib(),
        rss_before,
        statistics.fmean(losses),
        torch.get_num_threads(),
        probe.background_cores,
    )


def run_trl(model_dir: Path, s: BenchSettings, packed: bool, probe: LoopProbe) -> RunResult:
    """TRL's SFTTrainer with every default that differs from ours set explicitly."""
    import math

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from rlhf_core.modeling.models import load_model

    class LoopTimer(TrainerCallback):
        start = end = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            probe.start()
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()
            probe.stop()

    class CountingSFTTrainer(SFTTrainer):
        """Counts the non-padding input tokens of every micro-batch, as ours does."""

        input_tokens = 0

        def training_step(self, model, inputs, *args, **kwargs):
            if "attention_mask" in inputs:
                self.input_tokens += int(inputs["attention_mask"].sum())
            else:  # padding-free: one flattened row, no padding (pad_to_multiple_of is None)
                self.input_tokens += int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, *args, **kwargs)

    model, tokenizer = load_model(str(model_dir))
    rows = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in load_records(s)]
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    args = SFTConfig(
        output_dir=out_dir,
        seed=s.seed,
        use_cpu=True,
        max_steps=s.steps,
        per_device_train_batch_size=s.batch_size,
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
        gradient_checkpointing=False,
        max_length=s.max_length,
        packing=packed,
        packing_strategy="bfd",  # bfd => padding-free batches
        completion_only_loss=True,
        assistant_only_loss=False,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        torch_compile=False,
    )
    timer = LoopTimer()
    trainer = CountingSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    rss_before = current_rss_mib()
    output = trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    seconds = timer.end - timer.start
    return RunResult(
        "trl",
        "packed" if packed else "unpacked",
        trainer.input_tokens,
        seconds,
        trainer.input_tokens / seconds,
        peak_rss_mib(),
        rss_before,
        float(output.training_loss),  # mean over steps when logging is off
        torch.get_num_threads(),
        probe.background_cores,
    )


def worker_main(args: argparse.Namespace) -> None:
    settings = BenchSettings(**json.loads(args.settings))
    runner = run_ours if args.worker == "ours" else run_trl
    probe = LoopProbe(Path(args.profile_out) if args.profile_out else None)
    result = runner(Path(args.model_dir), settings, packed=args.mode == "packed", probe=probe)
    workers.emit_result(result)


# ----------------------------------------------------------------------------------------------- driver


def save_shared_model(directory: Path) -> Path:
    """Build the tiny model once and save it, so both contenders load identical weights."""
    from rlhf_core.modeling.models import build_tiny_model, save_model
    from rlhf_core.spec import TinyModelSource

    model, tokenizer = build_tiny_model(
        TinyModelSource(hidden_size=128, layers=2, heads=4, vocab_size=512), seed=0
    )
    return save_model(model, tokenizer, directory / "tiny")


def run_worker(
    contender: str, mode: str, model_dir: Path, settings: BenchSettings, profile_out: Path | None = None
) -> RunResult:
    """One contender in a fresh subprocess; returns what it measured."""
    flags = {"--worker": contender, "--mode": mode, "--model-dir": str(model_dir)}
    flags["--settings"] = json.dumps(asdict(settings))
    if profile_out is not None:
        flags["--profile-out"] = str(profile_out)
    return RunResult(**workers.run_worker(__file__, f"{contender}/{mode}", flags))


def run_quiet(
    contender: str,
    mode: str,
    model_dir: Path,
    settings: BenchSettings,
    args: argparse.Namespace,
    discarded: list[RunResult],
    profile_out: Path | None = None,
) -> RunResult:
    """Run once the box is quiet; redo a run that other processes disturbed (kept aside as discarded)."""
    return workers.run_quiet(
        lambda: run_worker(contender, mode, model_dir, settings, profile_out),
        f"{contender}/{mode}",
        args,
        discarded,
    )


def median_of(runs: list[RunResult], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def summarize(runs: list[RunResult]) -> dict[str, dict]:
    """Medians per (mode, contender), the ratios of the medians, and the median of per-repeat ratios.

    Runs are paired by repeat (ours and TRL ran back to back), so the per-repeat ratio cancels slow drift
    of the machine's speed.
    """
    summary: dict[str, dict] = {}
    for mode in [m for m in MODES if any(r.mode == m for r in runs)]:
        per: dict = {}
        for c in CONTENDERS:
            rs = [r for r in runs if r.mode == mode and r.contender == c]
            per[c] = {f"median_{f}": median_of(rs, f) for f in MEDIAN_FIELDS}
            per[c]["median_train_rss_increase_mib"] = statistics.median(
                r.peak_rss_mib - r.rss_before_train_mib for r in rs
            )
            per[c]["min_tokens_per_second"] = min(r.tokens_per_second for r in rs)
            per[c]["max_tokens_per_second"] = max(r.tokens_per_second for r in rs)
            per[c]["max_background_cores"] = max(r.background_cores for r in rs)
            per[c]["repeats"] = len(rs)
        ours = [r for r in runs if r.mode == mode and r.contender == "ours"]
        trl = [r for r in runs if r.mode == mode and r.contender == "trl"]
        paired = [o.tokens_per_second / t.tokens_per_second for o, t in zip(ours, trl, strict=True)]
        speedup = per["ours"]["median_tokens_per_second"] / per["trl"]["median_tokens_per_second"]
        rss_ratio = per["ours"]["median_peak_rss_mib"] / per["trl"]["median_peak_rss_mib"]
        per["speedup_ours_over_trl"] = speedup
        per["speedup_per_repeat"] = paired
        per["speedup_median_of_per_repeat"] = statistics.median(paired)
        per["peak_rss_ratio_ours_over_trl"] = rss_ratio
        per["target_met"] = speedup >= TARGET_SPEEDUP and rss_ratio <= 1.0
        summary[mode] = per
    return summary


def print_table(summary: dict[str, dict]) -> None:
    header = (
        f"{'mode':9} {'contender':9} {'tok/s median':>12} {'(min-max)':>13} {'peak RSS MiB':>12} "
        f"{'RSS before':>10} {'loop s':>7} {'mean loss':>9}"
    )
    print(header)
    print("-" * len(header))
    for mode, s in summary.items():
        for c in CONTENDERS:
            m = s[c]
            spread = f"{m['min_tokens_per_second']:.0f}-{m['max_tokens_per_second']:.0f}"
            print(
                f"{mode:9} {c:9} {m['median_tokens_per_second']:12.0f} {spread:>13} "
                f"{m['median_peak_rss_mib']:12.0f} {m['median_rss_before_train_mib']:10.0f} "
                f"{m['median_seconds']:7.2f} {m['median_mean_loss']:9.3f}"
            )
        verdict = "MET" if s["target_met"] else "NOT MET"
        print(
            f"{mode:9} ours/TRL  speed x{s['speedup_ours_over_trl']:.2f} "
            f"(per-repeat median x{s['speedup_median_of_per_repeat']:.2f}), "
            f"peak RSS x{s['peak_rss_ratio_ours_over_trl']:.2f} -> target "
            f"(>= {TARGET_SPEEDUP}x speed, <= 1.0x RSS) {verdict}"
        )


def settings_from(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        lr=args.lr,
        warmup_ratio=args.warmup_ratio,
        n_records=args.n_records,
        seed=0,
    )


def benchmark(args: argparse.Namespace, model_dir: Path) -> None:
    """Alternate the contenders ``--repeats`` times per mode; print the table and write the JSON."""
    settings = settings_from(args)
    runs: list[RunResult] = []
    discarded: list[RunResult] = []
    for i in range(args.repeats):
        order = CONTENDERS if i % 2 == 0 else CONTENDERS[::-1]  # flip the order every repeat
        for mode in args.modes:
            for contender in order:
                r = run_quiet(contender, mode, model_dir, settings, args, discarded)
                runs.append(r)
                print(
                    f"[{i + 1}/{args.repeats}] {mode:8} {contender:4} {r.tokens_per_second:8.0f} tok/s "
                    f"{r.tokens:7d} tok {r.seconds:6.2f} s  peak {r.peak_rss_mib:5.0f} MiB  "
                    f"mean loss {r.mean_loss:.3f}  background {r.background_cores:.2f} cores",
                    flush=True,
                )
    summary = summarize(runs)
    print()
    print_table(summary)
    write_report(args.out, {"settings": asdict(settings)}, VERSION_PACKAGES, summary, runs, discarded)


def profile(args: argparse.Namespace, model_dir: Path) -> None:
    """One profiled run per contender and mode; torch op tables go next to the JSON results."""
    settings = settings_from(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        for contender in CONTENDERS:
            table = args.out.parent / f"sft_profile_{contender}_{mode}.txt"
            r = run_quiet(contender, mode, model_dir, settings, args, [], profile_out=table)
            print(
                f"== {contender} {mode}: {r.tokens_per_second:.0f} tok/s under the profiler "
                f"(background {r.background_cores:.2f} cores) -> {table}"
            )
            print("\n".join(table.read_text().splitlines()[:16]))


def driver_main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_shared_model(Path(tmp))
        if args.profile:
            profile(args, model_dir)
        else:
            benchmark(args, model_dir)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="Runs per contender and mode.")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--steps", type=int, default=100, help="Optimizer steps (timed).")
    p.add_argument(
        "--batch-size", type=int, default=8, help="Rows per micro-batch (packed rows when packing)."
    )
    p.add_argument("--grad-accum", type=int, default=2, help="Micro-batches per optimizer step.")
    p.add_argument("--max-length", type=int, default=128, help="Max tokens per example / packed row.")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--n-records", type=int, default=6000, help="Conversations (enough for one packed epoch).")
    p.add_argument(
        "--profile", action="store_true", help="Instead: one torch-profiled run per contender and mode."
    )
    workers.add_measurement_options(p, "sft_throughput.json", CONTENDERS)
    # internal: the mode a worker process runs
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--profile-out", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    cli = parse_args()
    if cli.worker:
        worker_main(cli)
    else:
        driver_main(cli)
