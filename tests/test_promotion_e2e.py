"""Gated promotion, rollback and promotion by hand, through `rlhf run` / `rlhf models` on a real
Prefect server and MLflow registry.

One home, in order: a gate that holds makes sft v1 the champion (exit 0); a changed SFT whose gate
cannot hold registers v2, moves no alias, tags v2 with the reason and exits 3; a third version passes
and v1 becomes the previous champion; a rollback restores v1; a promotion by hand is recorded as such.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

pytestmark = pytest.mark.e2e
NAME = "e2e-promote-sft"


def _spec(max_steps: int, accuracy_min: float) -> dict:
    from conftest import TINY_SPEC

    spec = copy.deepcopy(TINY_SPEC)
    spec["name"] = "e2e-promote"
    del spec["stages"]["rm"]
    spec["stages"]["sft"]["train"]["max_steps"] = max_steps
    spec["stages"]["eval"].pop("data")
    spec["stages"]["promote"] = {
        "kind": "promote",
        "model": "sft",
        "evaluation": "eval.report",
        "gate": [{"metric": "accuracy", "min": accuracy_min}, {"metric": "accuracy_ci_high", "min": 0.0}],
    }
    return spec


@pytest.fixture(scope="module")
def home(tmp_path_factory, prefect_api_url):
    from registry import tracking
    from rlhf_core.settings import RLHFSettings

    path = tmp_path_factory.mktemp("promote-home")
    tracking.configure(RLHFSettings(home=path))  # this process reads the registry the runs write
    return Home(path, prefect_api_url)


class Home(type(Path())):
    """The pipeline home, with the Prefect API URL the runs report to."""

    def __new__(cls, path, api_url: str):
        home = super().__new__(cls, path)
        home.api_url = api_url
        return home


def _rlhf(home, *args: str):
    """`rlhf models ...` in this process (they log nothing through Prefect)."""
    from cli.app import app

    return CliRunner().invoke(app, [*args, "--home", str(home)], catch_exceptions=False)


def _run(home, tmp_path, max_steps: int, accuracy_min: float) -> subprocess.CompletedProcess:
    """`rlhf run` as a user runs it: its own process, on the session's Prefect server."""
    path = tmp_path / f"spec-{max_steps}.yaml"
    path.write_text(yaml.safe_dump(_spec(max_steps, accuracy_min)))
    env = {**os.environ, "PREFECT_API_URL": home.api_url, "COLUMNS": "200"}
    command = [sys.executable, "-m", "cli.app", "run", str(path), "--home", str(home)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    result.output = result.stdout + result.stderr
    result.exit_code = result.returncode
    return result


def _aliases() -> dict[str, str]:
    from mlflow import MlflowClient

    return {k: str(v) for k, v in MlflowClient().get_registered_model(NAME).aliases.items()}


def _tags(version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_model_version(NAME, version).tags)


@pytest.fixture(scope="module")
def promoted(home, tmp_path_factory):
    return _run(home, tmp_path_factory.mktemp("spec1"), 6, 0.0)


def test_a_gate_that_holds_makes_the_version_champion(promoted):
    assert promoted.exit_code == 0, promoted.output
    assert "promoted: e2e-promote-sft v1 is 'champion'" in promoted.output
    assert _aliases() == {"candidate": "1", "champion": "1"}
    tags = _tags("1")
    assert tags["rlhf.gate.decision"] == "passed" and tags["rlhf.promoted"] == "e2e-promote.promote"
    assert "accuracy=" in tags["rlhf.gate.figures"] and ">= 0 (ok)" in tags["rlhf.gate.figures"]


def test_a_failed_gate_moves_no_alias_tags_the_reason_and_exits_3(promoted, home, tmp_path):
    result = _run(home, tmp_path, 7, 1.5)  # accuracy cannot reach 1.5
    assert result.exit_code == 3, result.output
    assert "not promoted: e2e-promote-sft v2" in result.output
    assert "promotion gate of stage 'promote' rejected e2e-promote-sft v2" in result.output
    assert _aliases() == {"candidate": "2", "champion": "1"}
    tags = _tags("2")
    assert tags["rlhf.gate.decision"] == "failed"
    assert (
        ">= 1.5 (FAILED)" in tags["rlhf.gate.reason"] and "accuracy_ci_high" not in tags["rlhf.gate.reason"]
    )
    assert "rlhf.promoted" not in tags
    # the decision is cached with the stage: an unchanged re-run says the same and exits 3 again
    again = _run(home, tmp_path, 7, 1.5)
    assert again.exit_code == 3 and "cached" in again.output


def test_pass_keeps_the_previous_champion_then_rollback_and_manual_promotion(promoted, home, tmp_path):
    result = _run(home, tmp_path, 8, 0.0)
    assert result.exit_code == 0, result.output
    version = max(_aliases().values(), key=int)
    assert _aliases()["champion"] == version and _aliases()["previous-champion"] == "1"

    rolled = _rlhf(home, "models", "rollback", NAME)
    assert rolled.exit_code == 0, rolled.output
    assert _aliases()["champion"] == "1" and "previous-champion" not in _aliases()
    assert "manual" in _tags(version)["rlhf.rolled_back"]
    assert _tags("1")["rlhf.rolled_back_from"] == version
    nothing_left = _rlhf(home, "models", "rollback", NAME)
    assert nothing_left.exit_code == 2 and "nothing to roll back to" in nothing_left.output

    by_hand = _rlhf(home, "models", "promote", NAME, "2", "--reason", "hotfix")
    assert by_hand.exit_code == 0, by_hand.output
    assert _aliases()["champion"] == "2" and _aliases()["previous-champion"] == "1"
    assert _tags("2")["rlhf.promoted"] == "manual" and _tags("2")["rlhf.promoted_reason"] == "hotfix"

    listed = _rlhf(home, "models", "list", NAME)
    assert listed.exit_code == 0, listed.output
    assert "champion" in listed.output and "previous-champion" in listed.output
    assert "accuracy=" in listed.output  # the evaluation's figures, read from the logged model
    history = _rlhf(home, "models", "history", NAME)
    assert [line.count("manual") > 0 for line in history.output.splitlines() if "rollback" in line] == [True]
    missing = _rlhf(home, "models", "promote", NAME, "99")
    assert missing.exit_code == 2 and "has no version 99" in missing.output


def test_the_champion_as_a_registered_entry_is_the_baseline_of_a_new_candidate(promoted, home, tmp_path):
    """`models: {champion: {registered: models:/<name>@champion}}` pins the alias to its version now,
    downloads it once, keeps its registry name and version, and can be the evaluation's baseline."""
    spec = _spec(9, 0.0)
    spec["models"]["champion"] = {"registered": f"models:/{NAME}@champion"}
    spec["stages"]["eval"]["models"] = ["champion", "sft"]
    spec["stages"]["eval"]["baseline"] = "champion"
    spec["stages"]["eval"]["win_rate"] = {"judges": ["verifier"]}
    spec["stages"]["promote"]["gate"] = [{"metric": "win_rate/verifier", "min": 0.0}]
    path = tmp_path / "vs-champion.yaml"
    path.write_text(yaml.safe_dump(spec))
    champion = _aliases()["champion"]
    env = {**os.environ, "PREFECT_API_URL": home.api_url, "COLUMNS": "200"}
    command = [sys.executable, "-m", "cli.app", "run", str(path), "--home", str(home)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{NAME} v{champion} (used as is)" in result.stdout
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("e2e-promote").experiment_id],
        filter_string="tags.`rlhf.stage` = 'eval'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    metrics = runs[0].data.metrics
    assert "champion/eval/accuracy" in metrics and "sft/eval/win_rate/verifier" in metrics
    assert "champion/eval/win_rate/verifier" not in metrics  # the baseline is not compared with itself

    unknown = copy.deepcopy(spec)
    unknown["models"]["champion"] = {"registered": f"models:/{NAME}@no-such-alias"}
    path.write_text(yaml.safe_dump(unknown))
    bad = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "model 'champion', field registered:" in bad.stderr
