"""PNG plots of an evaluation report (matplotlib's Agg canvas, no display, no global pyplot state).

- one bar chart per figure that has an interval: a bar per model, the 95% bootstrap interval as error bar;
- reward vs KL: each model's mean reward (each ``eval/reward/<source>``; the verifier's accuracy when
  the stage has no reward source) against its KL to the reference, both with intervals (book ch.14:
  over-optimisation is read off reward-vs-KL curves);
- the best-of-N curve: proxy and gold reward of the best-of-N pick against N, a line per model, the
  KL bound of each N under its tick (:mod:`rlhf_core.evaluation.best_of_n_curve`).
"""

from __future__ import annotations

import re
from pathlib import Path

from rlhf_core.evaluation.best_of_n_curve import PREFIX as CURVE_PREFIX
from rlhf_core.evaluation.best_of_n_curve import kl_bound
from rlhf_core.evaluation.report_table import PREFIX, figure_names

KL = "eval/kl_to_reference"


def write_plots(
    report: dict[str, dict[str, float]], out_dir: str | Path, *, baseline: str | None = None
) -> list[Path]:
    """Write ``<figure>.png`` per figure with an interval, and ``reward_vs_kl.png`` when the report has
    a KL; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in figure_names(report):
        if any(f"{name}_ci_low" in m and name in m for m in report.values()):
            written.append(_bar_chart(report, name, out / f"{slug(name)}.png", baseline))
    rewards = reward_figures(report)
    if rewards and any(KL in m for m in report.values()):
        written.append(_reward_vs_kl(report, rewards, out / "reward_vs_kl.png", baseline))
    if any(curve_points(m) for m in report.values()):
        written.append(_best_of_n_curve(report, out / "best_of_n_curve.png"))
    return written


def curve_points(metrics: dict[str, float]) -> dict[int, tuple[float, float]]:
    """N -> (proxy, gold) of a model's best-of-N curve figures (empty without them)."""
    found = (re.fullmatch(rf"{CURVE_PREFIX}/proxy_at_(\d+)", name) for name in metrics)
    sizes = sorted(int(m.group(1)) for m in found if m)
    return {
        n: (metrics[f"{CURVE_PREFIX}/proxy_at_{n}"], metrics[f"{CURVE_PREFIX}/gold_at_{n}"])
        for n in sizes
        if f"{CURVE_PREFIX}/gold_at_{n}" in metrics
    }


def slug(name: str) -> str:
    """A file name for a figure: ``eval/win_rate/rm:rm`` -> ``win_rate-rm-rm``."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", name.removeprefix(PREFIX)).strip("-")


def reward_figures(report: dict[str, dict[str, float]]) -> list[str]:
    """The reward means to plot against KL: every ``eval/reward/<source>``, else accuracy."""
    names = [n for n in figure_names(report) if n.startswith(f"{PREFIX}reward/")]
    if not names and any(f"{PREFIX}accuracy" in m for m in report.values()):
        names = [f"{PREFIX}accuracy"]
    return names


def _errors(metrics: dict[str, float], name: str) -> tuple[float, float]:
    value = metrics[name]
    low, high = metrics.get(f"{name}_ci_low", value), metrics.get(f"{name}_ci_high", value)
    return max(0.0, value - low), max(0.0, high - value)


def new_figure(width: float, height: float):  # noqa: ANN202 - matplotlib types stay inside rlhf_core.evaluation
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _bar_chart(report: dict, name: str, path: Path, baseline: str | None) -> Path:
    models = [m for m, metrics in report.items() if name in metrics]
    values = [report[m][name] for m in models]
    errors = [_errors(report[m], name) for m in models]
    figure = new_figure(max(4.0, 1.2 * len(models) + 1.5), 3.4)
    axes = figure.add_subplot()
    colors = ["tab:gray" if m == baseline else "tab:blue" for m in models]
    labels = [_bar_label(model, report[model], name) for model in models]
    axes.bar(labels, values, color=colors, yerr=list(zip(*errors, strict=True)), capsize=6)
    if name.startswith(f"{PREFIX}win_rate/"):
        axes.axhline(0.5, color="black", linewidth=0.8, linestyle="--")  # parity with the baseline
    against = (
        f" vs {baseline}"
        if baseline and name.startswith((f"{PREFIX}win_rate/", f"{PREFIX}tie_rate/"))
        else ""
    )
    axes.set_title(f"{name.removeprefix(PREFIX)}{against} (95% bootstrap interval)")
    axes.set_ylabel(name.removeprefix(PREFIX))
    figure.savefig(path)
    return path


def _bar_label(model: str, metrics: dict[str, float], name: str) -> str:
    n = metrics.get(f"{name}_n")
    return f"{model}\n{metrics[name]:.3g}" + (f" (n={int(n)})" if n is not None else "")


def _reward_vs_kl(report: dict, rewards: list[str], path: Path, baseline: str | None) -> Path:
    figure = new_figure(4.6 * len(rewards), 3.8)
    for i, reward in enumerate(rewards):
        axes = figure.add_subplot(1, len(rewards), i + 1)
        for model, metrics in report.items():
            if KL not in metrics or reward not in metrics:
                continue
            x_err, y_err = _errors(metrics, KL), _errors(metrics, reward)
            marker = "s" if model == baseline else "o"
            axes.errorbar(
                metrics[KL], metrics[reward], xerr=[[x_err[0]], [x_err[1]]], yerr=[[y_err[0]], [y_err[1]]],
                fmt=marker, capsize=4, label=model,
            )  # fmt: skip
            axes.annotate(model, (metrics[KL], metrics[reward]), textcoords="offset points", xytext=(6, 4))
        axes.set_xlabel("KL to reference (nats, k1 estimate)")
        axes.set_ylabel(reward.removeprefix(PREFIX))
        axes.set_title(f"{reward.removeprefix(PREFIX)} vs KL")
        axes.legend(fontsize=8)
    figure.savefig(path)
    return path


def _best_of_n_curve(report: dict, path: Path) -> Path:
    figure = new_figure(9.2, 3.8)
    panels = figure.subplots(1, 2)
    sizes: set[int] = set()
    for model, metrics in report.items():
        points = curve_points(metrics)
        sizes |= set(points)
        for axes, values in zip(panels, zip(*points.values(), strict=True), strict=True):
            axes.plot(list(points), values, marker="o", label=model)
    ticks = sorted(sizes)
    for axes, which in zip(panels, ("proxy (best_of_n.rewards)", "gold"), strict=True):
        axes.set_xscale("log", base=2)
        axes.set_xticks(ticks, [f"{n}\n{kl_bound(n):.2f}" for n in ticks])
        axes.set_xlabel("N (below: KL bound log N - (N-1)/N, nats)")
        axes.set_ylabel(f"{which} reward of the pick")
        axes.set_title(f"best-of-N: {which}")
        axes.legend(fontsize=8)
    figure.savefig(path)
    return path
