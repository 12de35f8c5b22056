"""Time share of reward computation in a GRPO run, with the math verifier and with the code verifier.

Question answered: does scoring completions become the bottleneck of on-policy RL when the reward is a
real verifier? Each contender is our ``policy_gradient`` stage's training loop (``train_policy_gradient``,
``algorithm: grpo``) on the same briefly SFT-trained tiny Llama (``sft_policy.py``), P prompts x G
completions per rollout, ``truncated: score`` (every completion is scored), only the reward source
changing:

- ``arithmetic_exact``: the built-in plain-Python check of the synthetic task (the baseline);
- ``math_answer``: math-verify in its pool of spawned workers, on the same prompts (their ``answer``);
- ``code_tests``: the bubblewrap sandbox, the prompts being MBPP-style rows whose ``tests`` are run
  against each completion (the tiny policy writes arithmetic, not code: each completion is run as a
  program that fails at once, so this measures the sandbox's cost per completion, the floor of what a
  real policy's code costs).

Measured per run: the loop's wall seconds (``summary.seconds``), the reward seconds the stage logs per
rollout (``rollout/time/reward_s``: the reward function's wall time, the verifier's pool or sandbox
included), their ratio (the reward share) and the reward cost per completion. The math pool's start-up
(~2 s, once per process) is paid by a warm-up batch before the timed loop, as in a long run where it is
amortized; it is reported on its own. Then, outside RL, the cost per completion of ``code_tests`` on the
rows' correct reference solutions (tests that pass, a generation-sized batch) and of ``math_answer`` on
GSM8K-style reference solutions, to extrapolate to a real policy: share = reward / (reward +
generation and update) per completion.

Contenders alternate, the order flips every repeat; medians over repeats. A tiny model generates ~100x
faster than a real one, so the shares here are an upper bound for a real model on a GPU.

    python benchmarks/reward_share.py [--repeats 3] [--steps 4] [--out benchmarks/results/reward_share.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from report import write_report
from sft_policy import POLICY_TASK, run_with_policy

REPO_ROOT = Path(__file__).resolve().parents[1]
MBPP_ROWS = REPO_ROOT / "recipes" / "data" / "mbpp_sample.jsonl"
SOURCES = ("arithmetic_exact", "math_answer", "code_tests")
PACKAGES = ("torch", "transformers", "math-verify")


@dataclass
class RunResult:
    source: str
    repeat: int
    loop_s: float
    reward_s: float
    completions: int
    reward_share: float
    reward_ms_per_completion: float
    mean_reward: float


def math_rows(n: int, seed: int) -> list[dict]:
    from rlhf_core.data.synthetic import synthetic_records

    return synthetic_records("arithmetic", "prompts", n=n, seed=seed, **POLICY_TASK)


def code_rows(n: int) -> list[dict]:
    """MBPP rows as prompts with ``tests`` (their asserts) and ``setup``; cycled to ``n`` prompts."""
    rows = [json.loads(line) for line in MBPP_ROWS.read_text().splitlines() if line.strip()]
    prompts = [
        {
            "prompt": r["text"],
            "tests": r["test_list"],
            "setup": r.get("test_setup_code", ""),
            "code": r["code"],
        }
        for r in rows
    ]
    return [prompts[i % len(prompts)] for i in range(n)]


def stage_for(source: str, args: argparse.Namespace):
    from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage

    options = {"setup_column": "setup"} if source == "code_tests" else {}
    return PolicyGradientStage.model_validate(
        {
            "kind": "policy_gradient",
            "algorithm": "grpo",
            "policy": "policy",
            "prompts": "data.prompts",
            "rewards": [{"function": source, "options": options}],
            "rollouts": args.steps,
            "prompts_per_rollout": args.prompts,
            "group_size": args.group_size,
            "kl": {"beta": 0.0},
            "truncated": "score",
            "generation": {
                "max_new_tokens": args.max_new_tokens,
                "batch_size": args.prompts * args.group_size,
            },
            "train": {"lr": 1e-5, "batch_size": 16, "checkpoint_every": 10**6, "log_every": 1},
        }
    )


def run_one(model_dir: Path, source: str, repeat: int, args: argparse.Namespace) -> RunResult:
    from rlhf_core.modeling.models import load_model
    from rlhf_core.training.policy_gradient.rollouts import reward_function
    from rlhf_core.training.policy_gradient.trainer import train_policy_gradient

    model, tokenizer = load_model(str(model_dir))
    stage = stage_for(source, args)
    n = args.steps * args.prompts
    rows = code_rows(n) if source == "code_tests" else math_rows(n, seed=repeat)
    reward_fn = reward_function(stage.rewards, {}, "bench")
    reward_fn([{**rows[0], "completion": "warm-up"}])  # the math pool starts here, outside the loop
    logged: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        _, _, summary = train_policy_gradient(
            model, tokenizer, rows, stage, reward_fn, seed=repeat, checkpoint_dir=Path(tmp) / "ckpt",
            log=lambda metrics, step: logged.append(metrics),
        )  # fmt: skip
    rollouts = [m for m in logged if "rollout/time/reward_s" in m]
    reward_s = sum(m["rollout/time/reward_s"] for m in rollouts)
    completions = args.steps * args.prompts * args.group_size
    return RunResult(
        source, repeat, summary.seconds, reward_s, completions, reward_s / summary.seconds,
        1000 * reward_s / completions, statistics.fmean(m["rollout/reward_mean"] for m in rollouts),
    )  # fmt: skip


def reference_costs(batch: int) -> dict[str, float]:
    """ms per completion of the verifiers on correct answers (tests that pass), a batch of ``batch``."""
    from rlhf_core.rewards import reward_scorer

    out = {}
    rows = code_rows(batch)
    completions = [f"```python\n{r['code']}\n```" for r in rows]
    scorer = reward_scorer("code_tests", {"setup_column": "setup"})
    started = time.perf_counter()
    scores = scorer(completions, rows).scores
    out["code_tests_correct_ms"] = 1000 * (time.perf_counter() - started) / batch
    out["code_tests_correct_mean_score"] = statistics.fmean(scores)
    math = [
        {**r, "completion": f"Let us compute. The answer is \\boxed{{{r['answer']}}}."}
        for r in math_rows(batch, 7)
    ]
    scorer = reward_scorer("math_answer")
    scorer(["warm-up"], [math[0]])
    started = time.perf_counter()
    scores = scorer([r["completion"] for r in math], math).scores
    out["math_answer_correct_ms"] = 1000 * (time.perf_counter() - started) / batch
    out["math_answer_correct_mean_score"] = statistics.fmean(scores)
    return out


def pool_startup_s() -> float:
    """Wall seconds of the first math_answer call in a fresh process (the pool's start-up)."""
    import subprocess
    import sys

    code = (
        "import time\nfrom rlhf_core.rewards import reward_scorer\n"
        "if __name__ == '__main__':\n"
        "    s = reward_scorer('math_answer'); t = time.perf_counter()\n"
        "    s(['The answer is 2.'], [{'answer': '2'}]); print(time.perf_counter() - t)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def benchmark(args: argparse.Namespace, model_dir: Path) -> None:
    runs: list[RunResult] = []
    for repeat in range(args.repeats):
        order = SOURCES if repeat % 2 == 0 else tuple(reversed(SOURCES))
        for source in order:
            result = run_one(model_dir, source, repeat, args)
            print(
                f"repeat {repeat} {source:17s} loop {result.loop_s:6.1f} s  reward {result.reward_s:6.2f} s  "
                f"share {result.reward_share:6.1%}  {result.reward_ms_per_completion:6.2f} ms/completion"
            )
            runs.append(result)
    summary = {
        source: {
            "reward_share_median": statistics.median(r.reward_share for r in runs if r.source == source),
            "reward_ms_per_completion_median": statistics.median(
                r.reward_ms_per_completion for r in runs if r.source == source
            ),
            "loop_s_median": statistics.median(r.loop_s for r in runs if r.source == source),
        }
        for source in SOURCES
    }
    summary["outside_rl"] = reference_costs(args.prompts * args.group_size)
    summary["math_pool_startup_s"] = pool_startup_s()
    print(json.dumps(summary, indent=2))
    header = {"benchmark": "reward_share", "settings": vars(args) | {"out": str(args.out)}}
    write_report(Path(args.out), header, PACKAGES, summary, runs, [])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="rollouts per run")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--policy-dir", type=Path, default=None)
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "reward_share.json"))
    return parser.parse_args()


if __name__ == "__main__":
    run_with_policy(parse_args(), benchmark)
