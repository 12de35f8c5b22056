"""Lineage that says what code produced a model even outside a git checkout (``rlhf.git_commit`` unknown).

Every pipeline run, stage run and registered model version carries ``rlhf.package_version``, the version
of the installed ``rlhf-pipelines`` distribution, without the caller passing it.
"""

from __future__ import annotations

import importlib.metadata

import pytest


@pytest.fixture
def store_outside_git(tmp_path, monkeypatch):
    """A fresh SQLite store, with the working directory outside any git checkout."""
    from registry import tracking
    from rlhf_core.settings import RLHFSettings

    monkeypatch.chdir(tmp_path)
    settings = RLHFSettings(home=tmp_path / "home")
    tracking.configure(settings)
    assert tracking.git_commit() == "unknown"
    return settings


def test_pipeline_and_stage_runs_carry_the_package_version(store_outside_git):
    from registry import tracking

    version = importlib.metadata.version("rlhf-pipelines")
    experiment = tracking.ensure_experiment("lineage", store_outside_git)
    parent = tracking.start_pipeline_run(experiment, "lineage", {"rlhf.git_commit": "unknown"})
    stage = tracking.start_stage_run(experiment, parent, "sft", {"rlhf.kind": "sft"})
    for run_id in (parent, stage):
        tags = tracking.client().get_run(run_id).data.tags
        assert tags[tracking.PACKAGE_VERSION_TAG] == version
    tracking.reopen_run(stage, {"rlhf.resumed": "true"})
    assert tracking.client().get_run(stage).data.tags[tracking.PACKAGE_VERSION_TAG] == version


def test_registered_model_version_carries_the_package_version(store_outside_git, one_torch_thread):
    from registry import tracking
    from registry.models import log_and_register_model, model_version_tags
    from rlhf_core.modeling.models import build_tiny_model
    from rlhf_core.spec import TinyModelSource

    experiment = tracking.ensure_experiment("lineage", store_outside_git)
    parent = tracking.start_pipeline_run(experiment, "lineage", {})
    stage = tracking.start_stage_run(experiment, parent, "sft", {})
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    _, version = log_and_register_model(stage, model, tokenizer, "lineage-sft", {"rlhf.stage": "sft"})
    tags = model_version_tags("lineage-sft", version)
    assert tags[tracking.PACKAGE_VERSION_TAG] == importlib.metadata.version("rlhf-pipelines")
    assert tags["rlhf.stage"] == "sft"
