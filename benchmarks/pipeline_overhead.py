"""Pipeline overhead of ``rlhf run recipes/quickstart.yaml``: a first run, then a fully cached re-run.

Per trial (a fresh ``--home``): run the quickstart, then the same command again at once. For each run:
- wall time of the ``rlhf run`` process (start to exit, as the user waits for it);
- inside stages: the sum of ``end_time - start_time`` of the MLflow stage runs this pipeline run created
  (tag ``rlhf.run_type = stage``, tag ``rlhf.pipeline_run_id`` = this run's pipeline run). A stage run
  opens before the stage logs its config and inputs and closes after its outputs are logged, registered
  and recorded, so "inside stages" includes the stage's own MLflow logging and registration;
- overhead = wall time - inside stages: process start and imports, the Prefect ephemeral server, the
  flow run, MLflow set-up, fingerprinting and cache look-ups, and shutdown. It is split into before the
  pipeline's MLflow run opened (start-up), between its open and close outside stage runs (orchestration),
  and after it closed (teardown). The script also times a bare ``import cli.app, flows.pipeline``,
  the part of start-up that is Python imports.

A cached run creates no stage runs, so its overhead is its whole wall time.

    .venv/bin/python benchmarks/pipeline_overhead.py --trials 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from machine_load import run_timed, wait_for_quiet
from report import write_report

REPO = Path(__file__).resolve().parents[1]
RLHF = REPO / ".venv" / "bin" / "rlhf"


@dataclass
class PipelineRun:
    trial: int
    kind: str  # "first" or "cached"
    wall_s: float
    inside_stages_s: float
    overhead_s: float
    startup_s: float  # process start -> pipeline MLflow run opened
    orchestration_s: float  # pipeline run open -> closed, outside stage runs
    teardown_s: float  # pipeline run closed -> process exit
    stages: dict[str, float]  # stage name -> seconds of its MLflow run
    background_cores: float


def clean_env() -> dict[str, str]:
    """The caller's environment without settings that would point MLflow or the project elsewhere."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_", "MLFLOW_TRACKING_URI"))}


def run_quickstart(home: Path, recipe: Path) -> tuple[float, float, float]:
    """Run the recipe once; returns (start epoch s, end epoch s, background cores)."""
    timed = run_timed([str(RLHF), "run", str(recipe), "--home", str(home)], cwd=REPO, env=clean_env())
    if timed.proc.returncode != 0:
        raise RuntimeError(f"rlhf run failed (rc={timed.proc.returncode}):\n{timed.proc.stderr[-4000:]}")
    return timed.started_at, timed.started_at + timed.wall_s, timed.background_cores


def newest_pipeline_run(client, started_at: float):
    """The pipeline run that the invocation started at ``started_at`` opened."""
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`rlhf.run_type` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs or runs[0].info.start_time / 1000 < started_at:
        raise RuntimeError("no pipeline MLflow run was opened by this invocation")
    return runs[0]


def stage_durations(client, pipeline_run) -> dict[str, float]:
    """Seconds of each stage run that belongs to ``pipeline_run`` (none when every stage was cached)."""
    runs = client.search_runs(
        [pipeline_run.info.experiment_id],
        filter_string=(
            f"tags.`rlhf.run_type` = 'stage' and tags.`rlhf.pipeline_run_id` = '{pipeline_run.info.run_id}'"
        ),
    )
    return {r.data.tags["rlhf.stage"]: (r.info.end_time - r.info.start_time) / 1000 for r in runs}


def measure(trial: int, kind: str, home: Path, recipe: Path) -> PipelineRun:
    """Run the quickstart once and split its wall time using the MLflow store it wrote."""
    from mlflow import MlflowClient

    start, end, background = run_quickstart(home, recipe)
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    pipeline = newest_pipeline_run(client, start)
    stages = stage_durations(client, pipeline)
    inside = sum(stages.values())
    p_start, p_end = pipeline.info.start_time / 1000, pipeline.info.end_time / 1000
    return PipelineRun(
        trial=trial,
        kind=kind,
        wall_s=end - start,
        inside_stages_s=inside,
        overhead_s=(end - start) - inside,
        startup_s=p_start - start,
        orchestration_s=(p_end - p_start) - inside,
        teardown_s=end - p_end,
        stages=stages,
        background_cores=background,
    )


def summarize(runs: list[PipelineRun]) -> dict:
    """Medians per kind, and the cached/first wall-time ratio per trial and its median."""
    out: dict = {}
    for kind in ("first", "cached"):
        rs = [r for r in runs if r.kind == kind]
        fields = ("wall_s", "inside_stages_s", "overhead_s", "startup_s", "orchestration_s", "teardown_s")
        out[kind] = {f"median_{f}": statistics.median(getattr(r, f) for r in rs) for f in fields}
        out[kind]["max_background_cores"] = max(r.background_cores for r in rs)
    firsts = {r.trial: r for r in runs if r.kind == "first"}
    ratios = [r.wall_s / firsts[r.trial].wall_s for r in runs if r.kind == "cached"]
    out["cached_over_first"] = {"per_trial": ratios, "median": statistics.median(ratios)}
    out["target_met"] = out["cached_over_first"]["median"] < 0.25
    return out


def print_table(runs: list[PipelineRun], summary: dict) -> None:
    cols = ("wall_s", "inside_stages_s", "overhead_s", "startup_s", "orchestration_s", "teardown_s")
    print(f"{'trial':>5} {'run':7} " + " ".join(f"{c:>15}" for c in cols) + f" {'bg cores':>8}")
    for r in runs:
        print(
            f"{r.trial:5d} {r.kind:7} "
            + " ".join(f"{getattr(r, c):15.2f}" for c in cols)
            + f" {r.background_cores:8.2f}"
        )
    for kind in ("first", "cached"):
        print(f"{'med':>5} {kind:7} " + " ".join(f"{summary[kind]['median_' + c]:15.2f}" for c in cols))
    ratio = summary["cached_over_first"]["median"]
    verdict = "MET" if summary["target_met"] else "NOT MET"
    print(f"\ncached/first wall time: median {ratio:.1%} (target < 25%: {verdict})")


def import_seconds(repeats: int = 3) -> float:
    """Median wall time of a Python process that only imports the CLI and the pipeline flow.

    This is the part of start-up that is pure imports (torch, transformers, prefect, mlflow, ...).
    """
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-c", "import cli.app, flows.pipeline"]
    times = []
    for _ in range(repeats):
        timed = run_timed(cmd, cwd=REPO, env=clean_env())
        if timed.proc.returncode != 0:
            raise RuntimeError(f"importing the pipeline failed:\n{timed.proc.stderr[-4000:]}")
        times.append(timed.wall_s)
    return statistics.median(times)


def run_trial(trial: int, recipe: Path) -> list[PipelineRun]:
    """A first run and, at once, a cached re-run in a fresh home (a user re-running the same recipe)."""
    home = Path(tempfile.mkdtemp(prefix="rlhf-bench-home-"))
    try:
        return [measure(trial, kind, home, recipe) for kind in ("first", "cached")]
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    args = parse_args()
    wait_for_quiet(args.quiet_percent, args.quiet_timeout)
    imports = import_seconds()
    print(f"python imports of the CLI and flow: {imports:.1f} s (median of 3)", flush=True)
    runs: list[PipelineRun] = []
    discarded: list[PipelineRun] = []
    for trial in range(1, args.trials + 1):
        for _ in range(args.retries + 1):
            wait_for_quiet(args.quiet_percent, args.quiet_timeout)
            pair = run_trial(trial, args.recipe)
            for run in pair:
                print(
                    f"trial {trial} {run.kind:6}: wall {run.wall_s:6.1f} s, inside stages "
                    f"{run.inside_stages_s:6.1f} s, overhead {run.overhead_s:5.1f} s, "
                    f"background {run.background_cores:.2f} cores",
                    flush=True,
                )
            if max(r.background_cores for r in pair) <= args.max_background:
                break
            print("    discarded: other processes were busy during this trial", flush=True)
            discarded += pair
        runs += pair  # after all retries a disturbed trial is kept, flagged by background_cores
    summary = summarize(runs)
    summary["import_s"] = imports
    print()
    print_table(runs, summary)
    write_report(
        args.out,
        {"command": f"rlhf run {args.recipe.relative_to(REPO)} --home <fresh tmp dir>"},
        ("torch", "transformers", "prefect", "mlflow"),
        summary,
        runs,
        discarded,
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=3, help="First+cached pairs, each in a fresh --home.")
    p.add_argument("--recipe", type=Path, default=REPO / "recipes" / "quickstart.yaml")
    p.add_argument(
        "--quiet-percent",
        type=float,
        default=15.0,
        help="Start a trial only once total CPU use stays below this percent for 3 s.",
    )
    p.add_argument("--quiet-timeout", type=float, default=900.0, help="Give up waiting for quiet after this.")
    p.add_argument(
        "--max-background",
        type=float,
        default=0.15,
        help="Redo a trial when other processes used more than this many cores during one of its runs.",
    )
    p.add_argument("--retries", type=int, default=2, help="Redos of a disturbed trial before keeping it.")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pipeline_overhead.json")
    args = p.parse_args()
    args.recipe = args.recipe.resolve()
    return args


if __name__ == "__main__":
    main()
