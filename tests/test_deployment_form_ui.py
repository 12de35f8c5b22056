"""What a user sees of a deployed pipeline in the Prefect UI (scripts/deployment_form_screenshots.py).

``rlhf deploy recipes/quickstart.yaml --profile gpu --schedule ...`` against a real Prefect server with
its UI; then, in a headless Chromium, the deployment page must show its schedule and next run, Run ->
Custom run must open a form with one typed input per overridable spec value holding its default, and
the Force choice the stage names; the form, submitted with another seed, must create a flow run whose
``overrides`` carry that seed, in the shape ``run_pipeline`` takes. Skipped where no Chromium and
chromedriver are on PATH.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT


def _script():
    spec = importlib.util.spec_from_file_location(
        "deployment_form_screenshots", REPO_ROOT / "scripts" / "deployment_form_screenshots.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("deployment_form_screenshots", module)
    spec.loader.exec_module(module)
    return module


form_shots = _script()
NO_BROWSER = form_shots.shots.chromium_missing()


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_the_form_must_show_a_field_per_overridable_value_of_the_schema():
    from flows.deploy import parameter_form
    from rlhf_core.spec import load_spec, read_yaml

    spec = load_spec(form_shots.SPEC)
    schema = parameter_form(spec, read_yaml(form_shots.SPEC), "/home")
    overview, form = form_shots.pages("http://ui", {"id": "d1", "parameter_openapi_schema": schema})
    assert overview.url == "http://ui/v2/deployments/deployment/d1" and form.url == overview.url + "/run"
    assert "At 03:00 AM" in overview.expected
    for label in ("seed (Optional)", "stages.sft.train.lr (Optional)", "stages.sft.train.packing (Optional)"):
        assert label in form.expected
    assert "Force (Optional)" in form.expected


@pytest.mark.e2e
@pytest.mark.skipif(NO_BROWSER is not None, reason=f"no headless browser here: {NO_BROWSER}")
def test_a_deployed_pipeline_is_scheduled_and_started_from_its_form(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "shots"

    pages, submitted = form_shots.check(out, tmp_path / "home")

    assert {p.name: p.missing for p in pages if p.missing} == {}
    overview, form = pages
    assert {"At 03:00 AM", "Next Run", "pipelines"} <= set(overview.expected)
    assert "stages.sft.train.lr (Optional)" in form.expected
    for page in pages:
        assert _png_size(out / page.shots[0][1]) == page.window
    # the run the form made: the changed seed, every other value at its default, nothing forced
    assert submitted is not None and submitted.missing == []
    overrides = submitted.parameters["overrides"]
    assert overrides["seed"] == form_shots.NEW_SEED
    assert overrides["stages.sft.train.lr"] == pytest.approx(1e-3)
    assert overrides["stages.sft.train.epochs"] == 8
    assert submitted.parameters["force"] == []
    assert submitted.parameters["spec"]["name"] == "quickstart"
