"""Model cards on a real MLflow SQLite store: the version's description is a markdown card built from
its tags, its run's params and the metrics of its logged model; the chain of versions reads back as a
lineage tree."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def registry_home(tmp_path_factory, one_torch_thread):
    """Two registered versions, card-base v1 <- card-sft v1, like a base -> sft pipeline leaves them."""
    from registry import tracking
    from registry.models import log_and_register_model
    from rlhf_core.modeling.models import build_tiny_model
    from rlhf_core.settings import RLHFSettings
    from rlhf_core.spec import TinyModelSource

    settings = RLHFSettings(home=tmp_path_factory.mktemp("cards") / "home")
    tracking.configure(settings)
    experiment = tracking.ensure_experiment("card", settings)
    parent = tracking.start_pipeline_run(experiment, "card", {"rlhf.spec_digest": "s" * 64})
    tracking.log_text(
        parent, "name: card\nstages:\n  sft:\n    kind: sft\n    seed: 3\n", "resolved_spec.yaml"
    )
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    common = {"rlhf.git_commit": "abc123", "rlhf.spec_digest": "s" * 64}
    runs = {}
    for stage, upstream in (("base", None), ("sft", "card-base:1")):
        run = tracking.start_stage_run(
            experiment, parent, stage, {"rlhf.kind": stage, "rlhf.pipeline_run_id": parent}
        )
        tracking.log_params(run, {"config": {"train": {"lr": 0.003, "max_steps": 12}, "model": "base"}})
        tags = {**common, "rlhf.stage": stage, "rlhf.role": "policy", "rlhf.fingerprint": stage * 8}
        tags["rlhf.base_model"] = "base"
        if upstream:
            tags["rlhf.upstream_models"] = upstream
            tags["rlhf.dataset_digests"] = "data.sft=" + "d" * 64
        uri, version = log_and_register_model(run, model, tokenizer, f"card-{stage}", tags)
        runs[stage] = (run, uri, version)
    return experiment, parent, runs


def test_card_says_what_produced_the_version_and_links_its_lineage(registry_home):
    from registry.model_cards import refresh_model_card
    from registry.tracking import client

    experiment, parent, runs = registry_home
    run, _, version = runs["sft"]
    card = refresh_model_card("card-sft", version)
    assert client().get_model_version("card-sft", version).description == card
    assert card.startswith("# card-sft v1\n")
    assert "stage `sft`" in card and "(kind `sft`)" in card
    assert f"[{run}](#/experiments/{experiment}/runs/{run})" in card
    assert f"[pipeline run](#/experiments/{experiment}/runs/{parent})" in card
    assert "`abc123`" in card and "`" + "s" * 64 + "`" in card and "`" + "sft" * 8 + "`" in card
    assert "trained from: [card-base v1](#/models/card-base/versions/1) (`models:/card-base/1`)" in card
    assert "data `data.sft`: sha256 `" + "d" * 64 + "`" in card
    assert "`@candidate`" in card
    assert "lr: 0.003" in card and "max_steps: 12" in card  # the resolved config, from the run's params
    assert "No evaluation figures yet" in card and "Not gated yet" in card
    # the same card is an artifact of the version's run
    from mlflow.artifacts import load_text

    assert load_text(f"runs:/{run}/model_card.md") == card


def test_card_names_the_pipeline_run_that_finished_the_stage_in_its_own_experiment(registry_home):
    """A pipeline that resumed another pipeline's interrupted run: the stage run stays in the first
    experiment, and the card names (and links) the pipeline run that finished it, in its experiment."""
    from registry import tracking
    from registry.model_cards import model_card

    experiment, parent, runs = registry_home
    run, _, version = runs["base"]
    other = tracking.client().create_experiment("card-resumer")
    resumer = tracking.start_pipeline_run(other, "card-resumer", {})
    tracking.set_tags(run, {"rlhf.pipeline_run_id": resumer})
    try:
        card = model_card("card-base", version)
    finally:
        tracking.set_tags(run, {"rlhf.pipeline_run_id": parent})
    assert f"`card-resumer` ([pipeline run](#/experiments/{other}/runs/{resumer}))" in card
    assert f"[{run}](#/experiments/{experiment}/runs/{run})" in card  # the stage run, where it is


def test_card_shows_evaluation_figures_with_intervals_and_the_gate(registry_home):
    from registry.model_cards import refresh_model_card
    from registry.model_metrics import log_model_metrics
    from registry.tracking import client

    _, _, runs = registry_home
    run, uri, version = runs["sft"]
    figures = {
        "eval/accuracy": 0.8125,
        "eval/accuracy_ci_low": 0.7,
        "eval/accuracy_ci_high": 0.9,
        "eval/accuracy_n": 48,
        "eval/length/p50": 7.0,
    }
    assert log_model_metrics(run, uri, figures)
    client().set_model_version_tag("card-sft", version, "rlhf.gate.decision", "passed")
    client().set_model_version_tag("card-sft", version, "rlhf.gate.figures", "accuracy=0.81 >= 0.5")
    client().set_registered_model_alias("card-sft", "champion", version)
    card = refresh_model_card("card-sft", version)
    assert "- `eval/accuracy` = 0.8125 \\[0.7, 0.9\\] (n=48)" in card  # escaped: not a markdown link
    assert "- `eval/length/p50` = 7" in card
    assert "eval/accuracy_ci_low" not in card and "eval/accuracy_n" not in card
    assert "- decision: passed" in card and "- figures: accuracy=0.81 >= 0.5" in card
    assert "`@candidate`, `@champion`" in card


def test_card_without_params_takes_the_config_from_the_resolved_spec(registry_home):
    from registry.model_cards import model_card
    from registry.tracking import client

    experiment, parent, _ = registry_home
    from registry import tracking

    run = tracking.start_stage_run(experiment, parent, "sft", {"rlhf.pipeline_run_id": parent})
    version = client().create_model_version("card-sft", f"runs:/{run}/model", run_id=run)
    client().set_model_version_tag("card-sft", version.version, "rlhf.stage", "sft")
    card = model_card("card-sft", version.version)
    assert "## Resolved config of stage `sft`" in card and "seed: 3" in card


def test_a_failing_card_warns_and_never_raises(registry_home, caplog):
    from registry.model_cards import refresh_model_card

    assert refresh_model_card("no-such-model", "1") == ""
    assert "model card of no-such-model v1 not updated" in caplog.text


def test_a_long_card_is_shortened_for_the_description_but_kept_whole_in_the_run(registry_home):
    from mlflow.artifacts import load_text

    from registry import tracking
    from registry.model_cards import MAX_DESCRIPTION, refresh_model_card
    from registry.tracking import client

    _, _, runs = registry_home
    run, _, version = runs["base"]
    tracking.log_params(run, {"config": {f"field_{i}": "x" * 60 for i in range(100)}})
    card = refresh_model_card("card-base", version)
    description = client().get_model_version("card-base", version).description
    assert len(card) > MAX_DESCRIPTION >= len(description)
    assert "field_99" in load_text(f"runs:/{run}/model_card.md")
    assert "model_card.md" in description and "## Lineage" in description


def test_lineage_walks_from_an_alias_to_the_base_model(registry_home):
    from registry.lineage import model_lineage

    root = model_lineage("models:/card-sft@candidate")
    assert (root.name, root.stage, root.fingerprint, root.git_commit) == (
        "card-sft",
        "sft",
        "sft" * 8,
        "abc123",
    )
    assert root.datasets == {"data.sft": "d" * 64}
    [base] = root.upstream
    assert (base.label, base.relation, base.upstream) == ("card-base:1", "trained from", [])


@pytest.mark.parametrize("ref", ["models:/card-sft", "models:/card-sft/x", "card-sft:one", "card sft"])
def test_a_malformed_model_reference_is_a_user_error(registry_home, ref):
    from registry.lineage import resolve_version
    from rlhf_core.errors import UserError

    with pytest.raises(UserError, match="expected models:/<name>@<alias>"):
        resolve_version(ref)


def test_a_bare_name_is_its_champion_else_its_latest_version(registry_home):
    from registry.lineage import resolve_version
    from registry.tracking import client

    _, _, runs = registry_home
    run, uri, _ = runs["sft"]
    c = client()
    c.create_registered_model("card-bare")
    for _ in range(3):
        c.create_model_version("card-bare", uri, run_id=run)
    assert str(resolve_version("card-bare")) == "card-bare:3"  # no champion: the newest
    c.set_registered_model_alias("card-bare", "champion", "2")
    assert str(resolve_version("card-bare")) == "card-bare:2"
    assert str(resolve_version("card-bare:1")) == "card-bare:1"


def test_an_unknown_bare_name_is_a_user_error_naming_the_registered_models(registry_home):
    from registry.lineage import resolve_version
    from rlhf_core.errors import UserError

    with pytest.raises(UserError, match=r"'card-nobody': no such registered version .*card-base"):
        resolve_version("card-nobody")


def test_an_unknown_version_is_a_user_error_naming_the_registered_models(registry_home):
    from registry.lineage import resolve_version
    from rlhf_core.errors import UserError

    with pytest.raises(UserError, match=r"no such registered version .*card-base, card-sft"):
        resolve_version("card-sft:9")
    with pytest.raises(UserError, match="no such registered version"):
        resolve_version("models:/card-sft@nobody")
