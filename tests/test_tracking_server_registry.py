"""Shared-tracking rules that need no server: where new experiments keep artifacts, HTTP retry
defaults, and registration that a retried request cannot apply twice (on a local SQLite store)."""

from __future__ import annotations

import pytest

from registry import tracking
from rlhf_core.settings import RLHFSettings


def test_experiments_on_a_server_take_its_proxied_artifact_store(tmp_path):
    server = RLHFSettings(home=tmp_path, tracking_uri="http://mlflow.internal:5000")
    assert tracking.experiment_artifact_location("p", server) is None
    pinned = RLHFSettings(
        home=tmp_path, tracking_uri="http://mlflow.internal:5000", artifact_location="s3://bucket/rlhf/"
    )
    assert tracking.experiment_artifact_location("p", pinned) == "s3://bucket/rlhf/p"
    local = RLHFSettings(home=tmp_path)
    assert tracking.experiment_artifact_location("p", local) == (tmp_path / "mlartifacts").as_uri() + "/p"


def test_a_tracking_uri_with_a_password_is_refused_without_repeating_it(tmp_path):
    """It would be printed and stored in Prefect parameters; credentials belong in the environment."""
    from rlhf_core.errors import UserError

    with pytest.raises(UserError, match="MLFLOW_TRACKING_PASSWORD") as refused:
        RLHFSettings(home=tmp_path, tracking_uri="https://ci:s3cret@mlflow.internal").resolved_tracking_uri()
    assert "s3cret" not in str(refused.value)
    for fine in ("https://mlflow.internal", "postgresql://mlflow@db:5432/mlflow", "sqlite:////tmp/m.db"):
        assert RLHFSettings(home=tmp_path, tracking_uri=fine).resolved_tracking_uri() == fine


def test_http_retry_defaults_never_override_the_user(monkeypatch):
    for key in tracking.HTTP_RETRY_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    tracking.apply_http_retry_defaults()
    import os

    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    )

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 3
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1  # parsed by MLflow: an integer, as it requires
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A fresh SQLite store (made once: migrations take seconds) and an experiment in it."""
    home = tmp_path_factory.mktemp("registration-home")
    tracking.configure(RLHFSettings(home=home))
    return tracking.ensure_experiment("registration", RLHFSettings(home=home))


@pytest.fixture
def logged_model(experiment):
    """A new run with one logged (tiny pyfunc) model: (run id, its ``models:/m-...`` URI)."""
    import mlflow

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str]) -> list[str]:
            return model_input

    run = tracking.client().create_run(experiment)
    with tracking.activate_stage_run(run.info.run_id):
        info = mlflow.pyfunc.log_model(name="m", python_model=Echo(), pip_requirements=[])
    return run.info.run_id, info.model_uri


def test_a_version_created_twice_by_a_retried_request_is_kept_once(logged_model, monkeypatch):
    from registry import models

    run_id, uri = logged_model
    c = tracking.client()
    real = type(c).create_model_version

    def applied_twice(self, *args, **kwargs):  # what a POST retried after a lost answer does
        real(self, *args, **kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(c), "create_model_version", applied_twice)
    kept = models.register_version("twice", uri, run_id)
    assert str(kept.version) == "1"
    assert [str(v.version) for v in models.versions_of_run("twice", run_id)] == ["1"]


def test_registering_again_from_the_same_run_reuses_its_version(logged_model):
    """A stage retried or resumed in the same run after it registered: no second version, the tags and
    the alias are set again (no model is logged: ``model`` may be None)."""
    from registry import models

    run_id, uri = logged_model
    first = models.register_version("again", uri, run_id)
    model_uri, version = models.log_and_register_model(run_id, None, None, "again", {"rlhf.stage": "sft"})
    assert (model_uri, version) == (uri, str(first.version))
    assert len(models.versions_of_run("again", run_id)) == 1
    c = tracking.client()
    assert c.get_model_version("again", version).tags["rlhf.stage"] == "sft"
    assert str(c.get_model_version_by_alias("again", models.CANDIDATE_ALIAS).version) == version


def test_an_old_experiment_with_a_local_artifact_root_is_reported_against_a_server(experiment, caplog):
    """Through a server, a ``file:`` artifact root would make each client write to its own disk."""
    c = tracking.client()
    c.create_experiment("pinned-locally", artifact_location="file:///var/rlhf/mlartifacts/pinned-locally")
    server = RLHFSettings(tracking_uri="http://mlflow.internal:5000")
    with caplog.at_level("WARNING", logger="registry.tracking"):
        tracking.ensure_experiment("pinned-locally", server)
    assert "file:///var/rlhf/mlartifacts/pinned-locally" in caplog.text
    assert "RLHF_ARTIFACT_LOCATION" in caplog.text
    caplog.clear()
    c.create_experiment("proxied", artifact_location="mlflow-artifacts:/7")
    with caplog.at_level("WARNING", logger="registry.tracking"):
        tracking.ensure_experiment("proxied", server)
    assert caplog.text == ""
