"""The JSON report every benchmark script writes: header, machine, versions, summary, runs."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    return {p: md.version(p) for p in packages}


def write_report(
    out: Path,
    header: dict,
    packages: tuple[str, ...],
    summary: dict,
    runs: list,
    discarded: list,
) -> None:
    """Write ``out`` (runs and discarded runs are dataclasses) and say where it went."""
    report = {
        **header,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": package_versions(packages),
        "summary": summary,
        "runs": [asdict(r) for r in runs],
        "discarded_runs": [asdict(r) for r in discarded],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


def ratios(ours: list, theirs: list, field_name: str) -> dict:
    """ours / theirs of ``field_name`` over runs (dataclasses): the ratio of the medians and the per-repeat
    ratios (runs of one repeat ran back to back)."""
    paired = [getattr(o, field_name) / getattr(t, field_name) for o, t in zip(ours, theirs, strict=True)]
    median_ratio = statistics.median(getattr(r, field_name) for r in ours) / statistics.median(
        getattr(r, field_name) for r in theirs
    )
    return {
        "ratio_of_medians": median_ratio,
        "per_repeat": paired,
        "median_of_per_repeat": statistics.median(paired),
    }
