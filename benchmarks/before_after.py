"""Our own code in two checkouts, side by side: did a change make anything slower?

Runs, alternating OLD and NEW (the order flips every repeat, so machine drift hits both):

- ``quickstart``: ``rlhf run recipes/quickstart.yaml`` on a fresh home (wall seconds), then the same
  command again on that home (fully cached re-run);
- ``sft``, ``dpo``, ``grpo``: the ``ours`` contender of ``sft_throughput.py`` (packed),
  ``dpo_throughput.py`` and ``grpo_throughput.py`` (beta 0.04), each checkout running its own copy of the
  script in a fresh process on the same saved model with the same settings (the NEW script's defaults).

Both checkouts use this interpreter; each process gets ``PYTHONPATH=<checkout>``, so it imports that
checkout's packages. Prints medians and the median of per-repeat NEW/OLD ratios (throughput: > 1 is
faster; seconds: < 1 is faster) and writes them to ``--out``::

    git worktree add /tmp/old <commit>
    .venv/bin/python benchmarks/before_after.py /tmp/old . --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import workers
from machine_load import wait_for_quiet

HERE = Path(__file__).resolve().parent
# benchmark -> (script, worker contender, extra worker flags, the result field to compare)
THROUGHPUT = {
    "sft": ("sft_throughput.py", "ours", {"--mode": "packed"}, "tokens_per_second"),
    "dpo": ("dpo_throughput.py", "ours", {}, "tokens_per_second"),
    "grpo": ("grpo_throughput.py", "ours_beta", {}, "completions_per_second"),
}


def load_script(name: str):
    """A benchmark script of this checkout as a module (for its settings and shared model)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), HERE / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def default_settings(module) -> dict:
    """The settings the script's driver would use with its default options."""
    saved, sys.argv = sys.argv, [module.__file__]
    try:
        args = module.parse_args()
    finally:
        sys.argv = saved
    from dataclasses import asdict

    return asdict(module.settings_from(args))


def with_checkout(checkout: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(checkout)}


def run_throughput(checkout: Path, bench: str, model_dir: Path, settings: dict) -> float:
    script, contender, extra, field = THROUGHPUT[bench]
    flags = {
        "--worker": contender,
        "--model-dir": str(model_dir),
        "--settings": json.dumps(settings),
        **extra,
    }
    cmd = [sys.executable, str(checkout / "benchmarks" / script), *(p for kv in flags.items() for p in kv)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=with_checkout(checkout), cwd=checkout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(workers.RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{bench} in {checkout} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(workers.RESULT_PREFIX) :])[field]


def cli_module(checkout: Path) -> str:
    return "cli.app" if (checkout / "cli" / "app.py").exists() else "flows.cli"


def run_quickstart(checkout: Path) -> tuple[float, float]:
    """Seconds of a quickstart on a fresh home, and of its fully cached re-run."""
    home = Path(tempfile.mkdtemp(prefix="rlhf-before-after-"))
    cmd = [sys.executable, "-c", f"from {cli_module(checkout)} import main; main()"]
    cmd += ["run", "recipes/quickstart.yaml", "--home", str(home)]
    times = []
    try:
        for _ in range(2):
            start = time.perf_counter()
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=with_checkout(checkout), cwd=checkout
            )
            times.append(time.perf_counter() - start)
            if proc.returncode != 0:
                raise RuntimeError(f"quickstart in {checkout} failed:\n{proc.stderr[-3000:]}")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return times[0], times[1]


def summarize(values: dict[str, list[float]], higher_is_better: bool) -> dict:
    ratios = [n / o for o, n in zip(values["old"], values["new"], strict=True)]
    return {
        "old_median": statistics.median(values["old"]),
        "new_median": statistics.median(values["new"]),
        "new_over_old_median_ratio": statistics.median(ratios),
        "higher_is_better": higher_is_better,
        "old": values["old"],
        "new": values["new"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path, help="The checkout before the change.")
    p.add_argument("new", type=Path, help="The checkout after the change.")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--only", nargs="+", choices=["quickstart", *THROUGHPUT], default=["quickstart", *THROUGHPUT]
    )
    p.add_argument("--quiet-percent", type=float, default=15.0)
    p.add_argument("--quiet-timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=workers.RESULTS_DIR / "before_after.json")
    args = p.parse_args()
    checkouts = {"old": args.old.resolve(), "new": args.new.resolve()}
    report: dict = {"checkouts": {k: str(v) for k, v in checkouts.items()}, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        if "sft" in args.only:
            models["sft"] = load_script("sft_throughput.py").save_shared_model(Path(tmp) / "sft-model")
        if {"dpo", "grpo"} & set(args.only):
            from sft_policy import save_sft_policy

            models["dpo"] = models["grpo"] = save_sft_policy(Path(tmp) / "policy")
        for bench in args.only:
            if bench == "quickstart":
                first, cached = {"old": [], "new": []}, {"old": [], "new": []}
            else:
                settings = default_settings(load_script(THROUGHPUT[bench][0]))
                rates = {"old": [], "new": []}
            for i in range(args.repeats):
                for label in ("old", "new") if i % 2 == 0 else ("new", "old"):
                    wait_for_quiet(args.quiet_percent, args.quiet_timeout)
                    if bench == "quickstart":
                        a, b = run_quickstart(checkouts[label])
                        first[label].append(a)
                        cached[label].append(b)
                        print(
                            f"[{i + 1}] quickstart {label}: {a:6.1f} s, cached re-run {b:5.1f} s", flush=True
                        )
                    else:
                        rate = run_throughput(checkouts[label], bench, models[bench], settings)
                        rates[label].append(rate)
                        print(f"[{i + 1}] {bench} {label}: {rate:8.1f} {THROUGHPUT[bench][3]}", flush=True)
            if bench == "quickstart":
                report["quickstart_seconds"] = summarize(first, higher_is_better=False)
                report["quickstart_cached_seconds"] = summarize(cached, higher_is_better=False)
            else:
                report[f"{bench}_{THROUGHPUT[bench][3]}"] = summarize(rates, higher_is_better=True)
    print()
    for name, row in report.items():
        if isinstance(row, dict) and "old_median" in row:
            print(
                f"{name:32} old {row['old_median']:9.2f}  new {row['new_median']:9.2f}  "
                f"new/old {row['new_over_old_median_ratio']:.3f}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
