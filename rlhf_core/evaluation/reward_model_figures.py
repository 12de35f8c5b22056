"""The reward model's held-out reliability plot and breakdown table (book ch.5, RM evaluation).

``reliability.png``: for each confidence bin, the observed accuracy against the mean confidence
max(sigma(d), 1 - sigma(d)) of its pairs, with the diagonal a calibrated model would follow and the
pair counts under it; the expected calibration error in the title. ``heldout_breakdown.json``: the
bins and every held-out figure, for reading the numbers behind the plot.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from rlhf_core.evaluation.plots import new_figure
from rlhf_core.evaluation.reward_model_breakdown import ReliabilityBin, expected_calibration_error

RELIABILITY_PLOT = "reliability.png"
BREAKDOWN_FILE = "heldout_breakdown.json"


def write_reward_model_figures(
    metrics: dict[str, float], bins: list[ReliabilityBin], out_dir: str | Path, *, title: str
) -> list[Path]:
    """Write the reliability plot (when a bin has pairs) and the breakdown file; returns the files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    breakdown = out / BREAKDOWN_FILE
    reliability = [{k: _plain(v) for k, v in asdict(b).items()} for b in bins]
    breakdown.write_text(json.dumps({"metrics": metrics, "reliability": reliability}, indent=2))
    if not any(b.pairs for b in bins):
        return [breakdown]
    return [reliability_plot(bins, out / RELIABILITY_PLOT, title=title), breakdown]


def reliability_plot(bins: list[ReliabilityBin], path: Path, *, title: str) -> Path:
    """Observed accuracy vs mean confidence per non-empty bin, over the diagonal and the bin counts."""
    figure = new_figure(5.0, 5.2)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    filled = [b for b in bins if b.pairs]
    top.plot([0.5, 1.0], [0.5, 1.0], color="gray", linestyle="--", linewidth=0.8, label="calibrated")
    top.plot([b.confidence for b in filled], [b.accuracy for b in filled], marker="o", label="reward model")
    top.set_ylim(0.0, 1.02)
    top.set_ylabel("observed accuracy (r_c > r_r)")
    top.set_title(f"{title}: ECE {expected_calibration_error(bins):.3f}")
    top.legend(fontsize=8, loc="lower right")
    centers = [(b.low + b.high) / 2 for b in bins]
    bottom.bar(centers, [b.pairs for b in bins], width=bins[0].high - bins[0].low, color="tab:gray")
    bottom.set_xlabel("confidence max(sigma(d), 1 - sigma(d)), d = r_c - r_r")
    bottom.set_ylabel("pairs")
    bottom.set_xlim(0.5, 1.0)
    figure.savefig(path)
    return path


def _plain(value: float | int) -> float | int | None:
    """JSON has no NaN: an empty bin's mean is null."""
    return None if isinstance(value, float) and math.isnan(value) else value
