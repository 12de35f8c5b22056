"""Flow run names: two runs of one deployment never share a name."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from flows.pipeline import pipeline_run_name
from rlhf_core.spec import load_spec

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
NOW = datetime(2026, 12, 7, 3, 0, 0)


def test_two_runs_started_in_one_second_get_different_names():
    spec = load_spec(QUICKSTART)
    overrides = {"seed": 7}
    first = pipeline_run_name(spec, overrides, "0f1e2d3c-aaaa-bbbb-cccc-000000000001", NOW)
    second = pipeline_run_name(spec, overrides, "9a8b7c6d-aaaa-bbbb-cccc-000000000002", NOW)
    assert first != second
    assert first.startswith(f"{spec.name}-") and first.endswith("-20261207-030000-0f1e2d3c")


def test_the_digest_in_the_name_is_that_of_the_spec_the_overrides_make():
    spec = load_spec(QUICKSTART)
    plain = pipeline_run_name(spec, None, None, NOW)
    assert plain == f"{spec.name}-{spec.digest()[:8]}-20261207-030000"
    changed = pipeline_run_name(spec, {"seed": spec.seed + 1}, None, NOW)
    assert changed != plain
    assert pipeline_run_name(spec, {"seed": spec.seed}, None, NOW) == plain  # unchanged values


def test_a_bad_override_still_names_the_run_after_the_deployed_spec():
    spec = load_spec(QUICKSTART)
    name = pipeline_run_name(spec, {"stages.nope.x": 1}, None, NOW)
    assert name == f"{spec.name}-{spec.digest()[:8]}-20261207-030000"
