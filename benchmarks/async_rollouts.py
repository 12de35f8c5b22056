"""GRPO completions per second: synchronous vs asynchronous rollouts (K = 1, 2), 1 process vs 2, on CPU.

Every contender runs the real ``policy_gradient`` stage body (``optimize_on_rollouts``: GRPO, beta 0,
``--minibatches`` updates per rollout, 1 by default as in ``recipes/grpo_rlvr.yaml``) on the same
random-init model, prompts, reward (the share of digits in a completion, which a random policy can
raise) and seed:

- ``sync``: synchronous rollouts, one process, ``--threads`` torch threads (the whole machine);
- ``sync_1t``: the same on ``threads // 2`` threads: the trainer's share in the asynchronous runs, so
  ``async_k* / sync_1t`` is what overlapping gains when generation gets cores of its own (as a separate
  inference GPU or server does), and ``async_k* / sync`` what it gains on the same machine;
- ``async_k1``, ``async_k2``: ``async_rollouts: {max_staleness: K}``: the stage splits the threads
  between the trainer and the native loop in its background process (1 + 1 of 2);
- ``sync_2p``: synchronous, ``compute.processes: 2`` (two accelerate ranks over gloo), one thread each.

The rate is completions over the summed rollout cycles the stage logs (``rollout/idle/cycle_s``: from a
rollout's collection to its last update), the first ``--warmup`` rollouts left out; process start-up and
model loading are not in it (they are reported apart as ``wall_s``). Alongside: the median trainer and
engine idle shares (what explains the difference) and the mean reward of the last rollouts (the curves
must agree within noise for a speed-up to count).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/async_rollouts.py --size 5m

The machine must be otherwise idle: the contenders run one after another and are compared as ratios.

On a GPU machine (with the vLLM engine environment: ``rlhf engine install vllm``), the issue's setting:

    python benchmarks/async_rollouts.py --engine vllm --size 0.5b --contenders sync async_k1 async_k2 \
        --prompts 64 --group-size 8 --max-new-tokens 512 --lr 1e-6 --rollouts 10

synchronous with the engine colocated (asleep while the policy trains) vs asynchronous with it always up
beside the trainer on the same GPU (``vllm_settings``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

CONTENDERS = ("sync", "sync_1t", "async_k1", "async_k2", "sync_2p")


def digit_share(completion: str, record: dict) -> float:
    """The share of digit characters in the completion (a reward a random policy can move)."""
    return sum(ch.isdigit() for ch in completion) / max(1, len(completion))


def stage_spec(contender: str, args: argparse.Namespace):
    from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage

    spec = {
        "kind": "policy_gradient", "algorithm": "grpo", "policy": "p", "prompts": "data.prompts",
        "rewards": [{"function": "benchmarks.async_rollouts:digit_share"}], "kl": {"beta": 0.0},
        "rollouts": args.rollouts, "prompts_per_rollout": args.prompts, "group_size": args.group_size,
        "minibatches": args.minibatches, "truncated": "score",
        "generation": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "batch_size": 64},
        "train": {"lr": args.lr, "batch_size": 16, "log_every": 1, "checkpoint_every": 10_000},
    }  # fmt: skip
    if contender.startswith("async_k"):
        spec["async_rollouts"] = {"max_staleness": int(contender.removeprefix("async_k"))}
    if args.engine == "vllm":
        spec["generation"] |= {"engine": "vllm", "vllm": vllm_settings(contender)}
    import torch

    if torch.cuda.is_available():
        spec["train"]["precision"] = "bf16"  # autocast around fp32 master weights
    return PolicyGradientStage.model_validate(spec)


def vllm_settings(contender: str) -> dict:
    """The engine beside the trainer. On a GPU: synchronous, colocated (asleep while the policy trains);
    asynchronous, always up on the same GPU beside the trainer (a server placement on its device), with
    the share of memory colocated engines get. On a CPU: fp32, eager, one thread (as the tests)."""
    import torch

    if not torch.cuda.is_available():
        return {"dtype": "float32", "enforce_eager": True, "cpu_threads": 1, "max_model_len": 512}
    if contender.startswith("async_k"):
        return {"placement": "server", "devices": "0", "gpu_memory_utilization": 0.3}
    return {"placement": "colocated"}


def train(contender: str, model_dir: str, args: argparse.Namespace, work: Path) -> dict:
    """One contender's stage body in this process (a rank of ``sync_2p`` runs it too); its numbers."""
    from rlhf_core.data.synthetic import synthetic_records
    from rlhf_core.stage_environment import StageEnvironment
    from rlhf_core.training.policy_gradient.stage import PolicyGradientInputs, optimize_on_rollouts

    rollouts: list[dict] = []

    def log(metrics: dict, step: int) -> None:
        shown = {k.removeprefix("rollout/"): v for k, v in metrics.items() if k.startswith("rollout/")}
        if "reward_mean" in shown:
            rollouts.append(shown)
        elif rollouts:
            rollouts[-1].update(shown)  # idle shares come with the rollout's last update

    records = synthetic_records("arithmetic", "prompts", n=256, seed=0, max_operand=20, operations=("+", "-"))
    env = StageEnvironment("grpo", 0, work, work / "cache", work / "ckpt", log=log)
    started = time.perf_counter()
    optimize_on_rollouts(stage_spec(contender, args), PolicyGradientInputs(model_dir, None, records), env)
    wall = time.perf_counter() - started
    measured = rollouts[args.warmup :]
    per_rollout = args.prompts * args.group_size
    last = rollouts[-args.reward_window :]
    return {
        "contender": contender,
        "completions_per_s": per_rollout * len(measured) / sum(r["idle/cycle_s"] for r in measured),
        "wall_s": wall,
        "median_cycle_s": statistics.median(r["idle/cycle_s"] for r in measured),
        "trainer_idle_share": statistics.median(r["idle/trainer_share"] for r in measured),
        "engine_idle_share": statistics.median(r["idle/engine_share"] for r in measured),
        "mean_staleness": statistics.fmean(r.get("async/staleness_mean", 0.0) for r in measured),
        "reward_first": rollouts[0]["reward_mean"],
        "reward_last": statistics.fmean(r["reward_mean"] for r in last),
        "reward_curve": [round(r["reward_mean"], 4) for r in rollouts],
    }


def run_contender(contender: str, model_dir: str, args: argparse.Namespace) -> dict:
    """``contender`` with its threads: in this process, or as 2 accelerate ranks (``sync_2p``)."""
    import torch

    work = Path(tempfile.mkdtemp(prefix=f"async-bench-{contender}-"))
    if contender != "sync_2p":  # async: the stage splits these threads between trainer and background loop
        torch.set_num_threads(max(1, args.threads // 2) if contender == "sync_1t" else args.threads)
        try:
            return train(contender, model_dir, args, work)
        finally:
            torch.set_num_threads(args.threads)
    from runtime.multiprocess import free_port

    out = work / "rank0.json"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", "2",
        "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
        __file__, "--as-rank", str(out), "--model-dir", model_dir, *rank_arguments(args),
    ]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sync_2p ranks failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started  # with the launch and both ranks' start-up
    return result


def rank_arguments(args: argparse.Namespace) -> list[str]:
    keep = ("rollouts", "prompts", "group_size", "max_new_tokens", "lr", "minibatches", "warmup")
    keep += ("reward_window", "engine")
    return [part for k in keep for part in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def as_rank(args: argparse.Namespace) -> None:
    """A rank of ``sync_2p``: train; the main rank writes the numbers."""
    import torch
    from accelerate import PartialState

    from rlhf_core.training.engine.data_parallel import OtherRankFinished
    from runtime.multiprocess import exit_rank

    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    work = Path(tempfile.mkdtemp(prefix=f"async-bench-rank{state.process_index}-"))
    try:
        result = train("sync_2p", args.model_dir, args, work)
        args.as_rank.write_text(json.dumps(result))
    except OtherRankFinished:
        pass
    exit_rank()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--size",
        default="5m",
        help="Model size: benchmarks/rollout_engines.py SIZES, or 0.5b (the ~0.5B "
        "Llama shape of gpu_rollout_engine.py, with its 32k tokenizer).",
    )
    p.add_argument("--engine", choices=("native", "vllm"), default="native", help="Rollout engine.")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--threads", type=int, default=2, help="torch threads of the synchronous run.")
    p.add_argument("--rollouts", type=int, default=12)
    p.add_argument("--prompts", type=int, default=8, help="Prompts per rollout (P).")
    p.add_argument("--group-size", type=int, default=8, help="Completions per prompt (G).")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--minibatches", type=int, default=1, help="Updates per rollout.")
    p.add_argument("--warmup", type=int, default=2, help="First rollouts left out of the rate.")
    p.add_argument("--reward-window", type=int, default=4, help="Last rollouts whose mean reward is shown.")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/async_rollouts.json")
    p.add_argument("--as-rank", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.as_rank is not None:
        return as_rank(args)
    from rollout_engines import build_model

    from rlhf_core.modeling.models import save_model

    if args.size == "0.5b":
        from gpu_rollout_engine import FULL_SHAPE, build_policy

        model, tokenizer = build_policy(FULL_SHAPE)
    else:
        model, tokenizer = build_model(args.size, 512)
    model_dir = str(save_model(model, tokenizer, Path(tempfile.mkdtemp(prefix="async-bench-model-")) / "m"))
    results = []
    for contender in args.contenders:
        result = run_contender(contender, model_dir, args)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "reward_curve"}), flush=True)
    base = next((r for r in results if r["contender"] == "sync"), None)
    if base is not None:
        for r in results:
            ratio = r["completions_per_s"] / base["completions_per_s"]
            print(f"{r['contender']}: {ratio:.2f}x sync completions/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("as_rank", "model_dir")}
    args.out.write_text(json.dumps({"settings": settings, "results": results}, indent=1))


if __name__ == "__main__":
    main()
