"""The evaluation report as a markdown table: one row per model, one column per figure, each cell
``value [low, high] n=<count>`` (the 95% bootstrap interval and the number of values behind it)."""

from __future__ import annotations

import math
import re

PREFIX = "eval/"
SUFFIXES = ("_ci_low", "_ci_high", "_n")
# column order: headline figures first, the rest alphabetically after them
ORDER = (
    "accuracy", "pass_at_", "win_rate/", "tie_rate/", "reward/", "kl_to_reference", "nll", "perplexity",
    "length/", "best_of_n/", "judge_unparseable/",
)  # fmt: skip
HIDDEN = {"eval/loss", "eval/tokens"}  # eval/loss is eval/nll under its old name


def figure_names(report: dict[str, dict[str, float]]) -> list[str]:
    """Every figure of the report (metric names without the interval suffixes), in table order."""
    names = {_base(key) for metrics in report.values() for key in metrics}
    names -= HIDDEN if any("eval/nll" in m for m in report.values()) else {"eval/tokens"}

    def rank(name: str) -> tuple[int, str]:
        short = name.removeprefix(PREFIX)
        position = next((i for i, start in enumerate(ORDER) if short.startswith(start)), len(ORDER))
        return position, _natural(short)

    return sorted(names, key=rank)


def format_figure(metrics: dict[str, float], name: str) -> str:
    """``0.625 [0.5, 0.75] n=8``; ``—`` when the model has no such figure."""
    n = metrics.get(f"{name}_n")
    if name not in metrics:
        return "—" if n is None else f"— n={int(n)}"
    text = _number(metrics[name])
    if f"{name}_ci_low" in metrics and f"{name}_ci_high" in metrics:
        text += f" [{_number(metrics[f'{name}_ci_low'])}, {_number(metrics[f'{name}_ci_high'])}]"
    return text if n is None else f"{text} n={int(n)}"


def report_markdown(
    report: dict[str, dict[str, float]],
    *,
    baseline: str | None = None,
    reference: str | None = None,
    title: str = "Evaluation",
) -> str:
    """The report as markdown: a table (rows: models, columns: figures) and a note on how to read it."""
    names = figure_names(report)
    header = ["model", *(n.removeprefix(PREFIX) for n in names)]
    lines = [f"## {title}", "", _row(header), _row(["---"] * len(header))]
    for model, metrics in report.items():
        label = f"{model} (baseline)" if model == baseline else model
        lines.append(_row([label, *(format_figure(metrics, n) for n in names)]))
    lines += ["", "Cells: value [95% percentile-bootstrap interval] n = values resampled (prompts; held-out "
              "examples for nll; completions for lengths)."]  # fmt: skip
    if baseline is not None:
        lines.append(
            f"Win rates are against the baseline `{baseline}`, per prompt: (wins + ties / 2) / comparisons, "
            "so 0.5 is parity; tie_rate = ties / comparisons."
        )
    if reference is not None:
        lines.append(
            f"kl_to_reference: k1 estimate of KL(model || `{reference}`) on samples from the model "
            "at temperature 1 (summed over tokens, averaged over completions)."
        )
    return "\n".join(lines) + "\n"


def _base(key: str) -> str:
    for suffix in SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix)
    return key


def _natural(text: str) -> list:
    """Sort key that puts pass_at_2 before pass_at_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _number(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
