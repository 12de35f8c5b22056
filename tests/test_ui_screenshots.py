"""What a person sees: both UIs of a finished pipeline, in a headless Chromium (scripts/ui_screenshots.py).

One tiny pipeline (data, SFT, evaluate, promote) runs into a fresh home while the home's Prefect and MLflow
servers are up; then the registry page of the promoted version must show the version, the ``champion``
alias, the lineage tags and the model card; the evaluate run its metrics and report; the Prefect flow run
its evaluation artifact, and the artifact its table. Skipped where no Chromium and chromedriver are on PATH.
"""

from __future__ import annotations

import copy
import importlib.util
import struct
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, TINY_SPEC


def _script():
    spec = importlib.util.spec_from_file_location(
        "ui_screenshots", REPO_ROOT / "scripts" / "ui_screenshots.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ui_screenshots", module)
    spec.loader.exec_module(module)
    return module


shots = _script()
NO_BROWSER = shots.chromium_missing()


def _spec() -> dict:
    spec = copy.deepcopy(TINY_SPEC)
    spec["name"] = "e2e-shots"
    del spec["stages"]["rm"]
    spec["stages"]["sft"]["train"]["max_steps"] = 6
    spec["stages"]["eval"]["max_prompts"] = 8
    spec["stages"]["promote"] = {
        "kind": "promote",
        "model": "sft",
        "evaluation": "eval.report",
        "gate": [{"metric": "accuracy", "min": 0.0}],
    }
    return spec


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_what_the_pages_must_show_is_read_from_the_card_and_the_report():
    card = (
        "# m v2\n\n## Evaluation\n\n- `eval/accuracy` = 0.82 \\[0.765, 0.87\\] (n=200)\n\n## Promotion gate\n"
    )
    assert shots.card_lines(card) == [
        "m v2",
        "Evaluation",
        "Promotion gate",
        "eval/accuracy = 0.82 [0.765, 0.87] (n=200)",
    ]
    table = (
        "## Evaluation: eval\n\n| model | accuracy |\n| --- | --- |\n| base | 0 [0, 0] n=8 |\n| sft | 1 |\n"
    )
    assert shots.report_cells(table) == [["base", "0 [0, 0] n=8"], ["sft", "1"]]


@pytest.mark.e2e
@pytest.mark.skipif(NO_BROWSER is not None, reason=f"no headless browser here: {NO_BROWSER}")
def test_both_uis_show_the_promoted_version_its_card_lineage_and_evaluation(tmp_path, monkeypatch):
    from rlhf_core.settings import RLHFSettings, apply_environment_defaults

    for name in ("PREFECT_HOME", "PREFECT_API_URL"):  # the home's own Prefect database, as `rlhf ui` uses
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models; threads only fight on a busy machine
    settings = RLHFSettings(home=tmp_path / "home")
    apply_environment_defaults(settings)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec()))
    out = tmp_path / "shots"
    out.mkdir()

    with shots.running_uis(settings) as uis:
        shots.run_pipeline(spec_path, settings, uis)
        pages = shots.pages(uis, None)
        with shots.browser() as driver:
            shots.quiet_mlflow(driver, uis.mlflow)
            for page in pages:
                shots.shoot(driver, page, out)
            # the check can fail: a text the version page does not have is reported as missing
            absent = shots.Page("absent", pages[0].url, ["champion", "no-such-alias-x"], [((), "absent.png")])
            shots.shoot(driver, absent, out, timeout_s=3)

    assert {p.name: p.missing for p in pages if p.missing} == {}
    assert absent.missing == ["no-such-alias-x"]
    version, eval_run, report_md, flow_run, artifact = pages
    # what the pages were checked for: the promoted version, its alias, lineage and card
    assert version.url.endswith("#/models/e2e-shots-sft/versions/1?workflowType=machine_learning")
    for text in ("Version 1", "champion", "rlhf.upstream_models", "e2e-shots-base:1", "Promotion gate"):
        assert text in version.expected
    assert "decision: passed" in version.expected and "eval/accuracy = " in " ".join(version.expected)
    assert "sft/eval/accuracy" in eval_run.expected
    assert {"sft", "base"} <= set(report_md.expected) and {"sft", "base"} <= set(artifact.expected)
    assert "e2e-shots-eval-report" in flow_run.expected and flow_run.expected[0].startswith("e2e-shots-")
    for page in pages:
        for _, png in page.shots:
            assert _png_size(out / png) == page.window, png
