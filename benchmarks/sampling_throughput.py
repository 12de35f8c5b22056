"""Sampling throughput: our ``sample_completions`` against a plain ``model.generate`` loop.

Both sample N completions per prompt from the same saved, briefly SFT-trained tiny Llama
(``sft_policy.py``) at the same batch size: prompts rendered with the chat template (user turn +
assistant header), left-padded, ``do_sample=True`` with the same temperature / top_p / max_new_tokens,
``top_k=0`` (off: ours sets it, and the model's generation config would otherwise default to 50),
``use_cache=True`` (KV cache), stopping at EOS (``<|im_end|>``).

Measured per run, each in a fresh subprocess (contenders alternate, the order flips every repeat):
- Random draws: ``model.generate`` (the plain loop and ``ours_transformers``) is seeded per batch the
  way ours seeds it, so those two draw the same completions. The native loop draws from its own
  generator, so its completions differ; since the cost of a batch depends on its draws (with
  ``generate`` a batch decodes until its longest completion ends), every repeat uses a new seed for
  all contenders (``sample_seed`` = repeat index), so draw luck averages out over the repeats.
- new tokens/s = generated tokens, counted per completion up to and including the first EOS (the
  whole row when no EOS), / seconds of the whole sampling call. Both timed regions include chat
  rendering, tokenization, ``generate`` and decoding of every batch.

    .venv/bin/python benchmarks/sampling_throughput.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import workers
from machine_load import BackgroundMeter
from report import write_report
from sft_policy import POLICY_TASK, run_with_policy
from sft_throughput import VERSION_PACKAGES, peak_rss_mib

# "ours" is the sample stage's default engine (native decoding loop); "ours_transformers" is the same
# stage with generation.engine: transformers (model.generate inside), to show where a difference comes from.
CONTENDERS = ("ours", "ours_transformers", "generate")


@dataclass
class BenchSettings:
    prompts: int
    n: int
    batch_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int  # the prompts
    sample_seed: int = 0  # the random draws; changes every repeat, the same for all contenders of a repeat


@dataclass
class RunResult:
    contender: str
    new_tokens: int
    sequences: int
    seconds: float
    new_tokens_per_second: float
    eos_fraction: float  # completions that ended with EOS before max_new_tokens
    peak_rss_mib: float
    background_cores: float


def prompt_rows(s: BenchSettings) -> list[dict]:
    from rlhf_core.data.synthetic import synthetic_records

    return synthetic_records("arithmetic", "prompts", n=s.prompts, seed=s.seed + 1, **POLICY_TASK)


def run_ours(model, tokenizer, s: BenchSettings, engine: str = "native") -> tuple[list[int], float]:
    from rlhf_core.rollout.sampling import sample_completions
    from rlhf_core.spec import SamplingSpec

    cfg = SamplingSpec(
        temperature=s.temperature,
        top_p=s.top_p,
        max_new_tokens=s.max_new_tokens,
        batch_size=s.batch_size,
        engine=engine,
    )
    rows, _, seconds = sample_completions(model, tokenizer, prompt_rows(s), s.n, cfg, seed=s.sample_seed)
    return [r["new_tokens"] for r in rows], seconds


def run_generate(model, tokenizer, s: BenchSettings) -> tuple[list[int], float]:
    """The plain loop a user would write: render, left-pad, generate, count up to EOS, decode."""
    import torch

    prompts = [r["prompt"] for r in prompt_rows(s) for _ in range(s.n)]
    tokenizer.padding_side = "left"
    # per-batch seeds drawn as ours draws them, so both sample the same completions (same work)
    seeds = torch.Generator().manual_seed(s.sample_seed)
    lengths: list[int] = []
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(prompts), s.batch_size):
            chats = [[{"role": "user", "content": p}] for p in prompts[start : start + s.batch_size]]
            texts = tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=seeds)))
            out = model.generate(
                **enc,
                max_new_tokens=s.max_new_tokens,
                do_sample=True,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=0,
                use_cache=True,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )  # (B, prompt_len + new)
            new = out[:, enc["input_ids"].shape[1] :]
            tokenizer.batch_decode(new, skip_special_tokens=True)
            for row in new.tolist():
                lengths.append(
                    row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
                )
    return lengths, time.perf_counter() - started


def worker_main(args: argparse.Namespace) -> None:
    from rlhf_core.modeling.models import load_model

    s = BenchSettings(**json.loads(args.settings))
    model, tokenizer = load_model(args.model_dir)
    model.eval()
    meter = BackgroundMeter().start()
    if args.worker == "generate":
        lengths, seconds = run_generate(model, tokenizer, s)
    else:
        engine = "native" if args.worker == "ours" else "transformers"
        lengths, seconds = run_ours(model, tokenizer, s, engine)
    background = meter.stop()
    result = RunResult(
        args.worker, sum(lengths), len(lengths), seconds, sum(lengths) / seconds,
        sum(n < s.max_new_tokens for n in lengths) / len(lengths), peak_rss_mib(), background,
    )  # fmt: skip
    workers.emit_result(result)


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
            for f in ("new_tokens_per_second", "new_tokens", "seconds", "eos_fraction", "peak_rss_mib")
        }
        per[c]["min_new_tokens_per_second"] = min(r.new_tokens_per_second for r in rs)
        per[c]["max_new_tokens_per_second"] = max(r.new_tokens_per_second for r in rs)
        per[c]["max_background_cores"] = max(r.background_cores for r in rs)
    gen = [r for r in runs if r.contender == "generate"]
    key = "median_new_tokens_per_second"
    for name in ("ours", "ours_transformers"):
        mine = [r for r in runs if r.contender == name]
        paired = [o.new_tokens_per_second / g.new_tokens_per_second for o, g in zip(mine, gen, strict=True)]
        per[f"speed_ratio_{name}_over_generate"] = per[name][key] / per["generate"][key]
        per[f"speed_ratio_{name}_per_repeat"] = paired
        per[f"speed_ratio_{name}_median_of_per_repeat"] = statistics.median(paired)
    return per


def benchmark(args: argparse.Namespace, model_dir: Path) -> None:
    s = BenchSettings(
        prompts=args.prompts, n=args.n, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=0,
    )  # fmt: skip
    runs: list[RunResult] = []
    discarded: list[RunResult] = []
    for i in range(args.repeats):
        s = BenchSettings(**{**asdict(s), "sample_seed": i})
        for contender in CONTENDERS if i % 2 == 0 else CONTENDERS[::-1]:
            r = run_quiet(contender, model_dir, s, args, discarded)
            runs.append(r)
            print(
                f"[{i + 1}/{args.repeats}] {contender:17} {r.new_tokens_per_second:8.0f} new tok/s "
                f"{r.new_tokens:6d} tok {r.seconds:6.2f} s  EOS {r.eos_fraction:.2f}  "
                f"peak {r.peak_rss_mib:4.0f} MiB  background {r.background_cores:.2f} cores",
                flush=True,
            )
    summary = summarize(runs)
    print()
    for c in CONTENDERS:
        m = summary[c]
        print(
            f"{c:17} {m['median_new_tokens_per_second']:8.0f} new tok/s (min-max "
            f"{m['min_new_tokens_per_second']:.0f}-{m['max_new_tokens_per_second']:.0f}), "
            f"{m['median_new_tokens']:.0f} tokens, {m['median_seconds']:.2f} s, "
            f"EOS {m['median_eos_fraction']:.2f}"
        )
    for name in ("ours", "ours_transformers"):
        print(
            f"{name}/generate x{summary[f'speed_ratio_{name}_over_generate']:.2f} "
            f"(per-repeat median x{summary[f'speed_ratio_{name}_median_of_per_repeat']:.2f})"
        )
    settings = {**asdict(s), "sample_seed": "repeat index (0, 1, ...)"}
    write_report(args.out, {"settings": settings}, VERSION_PACKAGES, summary, runs, discarded)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="Runs per contender.")
    p.add_argument("--prompts", type=int, default=64, help="Distinct prompts.")
    p.add_argument("--n", type=int, default=4, help="Completions per prompt.")
    p.add_argument("--batch-size", type=int, default=64, help="Sequences per generate call.")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--policy-dir", type=Path, help="Reuse a policy saved by sft_policy.save_sft_policy.")
    workers.add_measurement_options(p, "sampling_throughput.json", CONTENDERS)
    return p.parse_args()


if __name__ == "__main__":
    cli = parse_args()
    if cli.worker:
        worker_main(cli)
    else:
        run_with_policy(cli, benchmark)
