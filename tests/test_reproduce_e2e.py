"""Reproduce from lineage, end to end: a tiny base -> data (a local JSONL file) -> sft pipeline runs on
a real Prefect server and MLflow store; then, from nothing but the registry, ``rlhf reproduce`` says
whether each stage would be rebuilt the same, names what changed, and ``--run`` rebuilds the model."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rlhf_core.spec import parse_spec

pytestmark = pytest.mark.e2e
MODEL = "models:/rep-sft@candidate"


@pytest.fixture(scope="module")
def produced(tmp_path_factory, prefect_api_url, one_torch_thread):
    """The pipeline run that registered rep-sft v1 (and rep-base v1)."""
    from conftest import TINY_SPEC

    from flows.pipeline import run_pipeline
    from rlhf_core.data.loading import write_jsonl
    from rlhf_core.data.synthetic import synthetic_records

    root = tmp_path_factory.mktemp("reproduce")
    write_jsonl(synthetic_records("arithmetic", "sft", n=40, seed=1), root / "rows.jsonl")
    sft = {**TINY_SPEC["stages"]["sft"], "train": {**TINY_SPEC["stages"]["sft"]["train"], "max_steps": 4}}
    spec = parse_spec(
        {
            "name": "rep",
            "models": TINY_SPEC["models"],
            "stages": {
                "data": {
                    "kind": "dataset",
                    "source": {"file": {"path": str(root / "rows.jsonl"), "format": "sft"}},
                },
                "sft": sft,
            },
        }
    )
    outcomes = run_pipeline(spec, home=str(root / "home"))
    assert [o.status for o in outcomes] == ["ran"] * 3
    return root, {o.stage: o for o in outcomes}


def _cli(*args: str):
    from cli.app import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_unchanged_pipeline_reproduces_with_every_stage_matching(produced):
    from cli.reproduce import check_reproduction

    root, outcomes = produced
    result, spec, _ = check_reproduction(MODEL, str(root / "home"))
    assert (str(result.model), result.stage, spec.name) == ("rep-sft:1", "sft", "rep")
    assert [(c.stage, c.status, c.in_home) for c in result.checks] == [
        ("base", "match", "cached"),
        ("data", "match", "cached"),
        ("sft", "match", "cached"),
    ]
    assert result.checks[2].recorded == result.checks[2].current == outcomes["sft"].fingerprint
    cli = _cli("reproduce", "rep-sft:1", "--home", str(root / "home"))
    assert cli.exit_code == 0, cli.output
    assert "all stages match: rep-sft:1" in cli.output


def test_a_stage_the_pipeline_run_did_not_list_is_found_by_the_digest_its_consumer_read(produced):
    """As when a pipeline run failed after taking a stage from cache: no stage tag names that run."""
    from cli.reproduce import check_reproduction
    from registry import tracking
    from rlhf_core.settings import RLHFSettings

    root, outcomes = produced
    tracking.configure(RLHFSettings(home=root / "home"))
    c = tracking.client()
    data_run = outcomes["data"].run_id
    parent = c.get_run(data_run).data.tags["rlhf.pipeline_run_id"]
    listed = c.get_run(parent).data.tags["stage.data"]
    c.delete_tag(data_run, "rlhf.pipeline_run_id")
    c.delete_tag(parent, "stage.data")
    try:
        result, _, record = check_reproduction(MODEL, str(root / "home"))
    finally:
        c.set_tag(data_run, "rlhf.pipeline_run_id", parent)
        c.set_tag(parent, "stage.data", listed)
    assert record.stages["data"].run_id == data_run
    assert [c.status for c in result.checks] == ["match"] * 3


def test_an_edited_data_file_is_named_with_its_stage_and_the_stages_after_it(produced):
    root, _ = produced
    rows = root / "rows.jsonl"
    original = rows.read_text()
    rows.write_text("".join(original.splitlines(keepends=True)[:-1]))  # the last row removed
    try:
        cli = _cli("reproduce", MODEL, "--home", str(root / "home"))
    finally:
        rows.write_text(original)
    assert cli.exit_code == 4, cli.output
    assert "2 of 3 stage(s) differ from the record of rep-sft:1:" in cli.output
    assert "  stage data: local file source.file.path changed (digest " in cli.output
    assert "  stage sft: differs because upstream data differs" in cli.output
    assert "stage base:" not in cli.output


def test_changed_code_is_named_for_every_stage(produced, monkeypatch):
    from cli.reproduce import check_reproduction
    from rlhf_core import fingerprint

    root, _ = produced
    monkeypatch.setattr(fingerprint, "code_digest", lambda: "0" * 64)
    result, _, _ = check_reproduction(MODEL, str(root / "home"))
    assert [c.status for c in result.checks] == ["differs"] * 3
    assert result.checks[0].reasons[0].startswith("code changed (rlhf_core digest ")
    assert result.checks[0].reasons[0].endswith(" -> 000000000000)")
    assert result.checks[2].reasons[-1] == "differs because upstream data differs"
    assert [c.in_home for c in result.checks] == ["run", "run", "run"]


def test_lineage_of_the_sft_model_leads_to_the_base_model_and_its_data(produced):
    from registry import tracking
    from registry.lineage import model_lineage
    from rlhf_core.settings import RLHFSettings

    root, outcomes = produced
    tracking.configure(RLHFSettings(home=root / "home"))
    node = model_lineage(MODEL)
    data = outcomes["data"].outputs["sft"]
    assert (node.label, node.stage, node.role, node.aliases) == ("rep-sft:1", "sft", "policy", ["candidate"])
    assert (node.run_id, node.fingerprint) == (outcomes["sft"].run_id, outcomes["sft"].fingerprint)
    assert node.datasets == {"data.sft": data.digest}
    [base] = node.upstream
    assert (base.label, base.relation, base.stage, base.upstream) == (
        "rep-base:1",
        "trained from",
        "base",
        [],
    )
    version = tracking.client().get_model_version("rep-sft", "1")
    assert version.tags["rlhf.upstream_model_uri"] == "models:/rep-base/1"
    assert "[rep-base v1](#/models/rep-base/versions/1)" in version.description
    from registry.model_cards import refresh_model_card

    assert refresh_model_card("rep-sft", "1") == version.description  # rebuilt from the registry alone
    cli = _cli("models", "lineage", MODEL, "--home", str(root / "home"))
    assert cli.exit_code == 0, cli.output
    assert "rep-sft:1" in cli.output and "trained from: rep-base:1" in cli.output
    assert data.digest[:16] in cli.output


def test_an_unknown_model_is_a_user_error(produced):
    root, _ = produced
    cli = _cli("reproduce", "models:/rep-sft@champion", "--home", str(root / "home"))
    assert cli.exit_code == 2
    assert "no such registered version" in cli.output


def test_run_rebuilds_the_model_with_the_same_weights(produced, tmp_path):
    """Same code, data, config and seed on CPU: the rebuilt weights are bit-identical."""
    root, outcomes = produced
    cli = _cli("reproduce", MODEL, "--home", str(root / "home"), "--run", "--into", str(tmp_path / "again"))
    assert cli.exit_code == 0, cli.output
    digest = outcomes["sft"].outputs["model"].digest
    assert f"weights digest equal to the registered one ({digest[:16]})" in cli.output
    assert "output digests per stage: base equal, data equal, sft equal" in cli.output
    assert (tmp_path / "again" / "mlflow.db").exists()
