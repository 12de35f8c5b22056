"""MLflow runs: one parent run per pipeline run, one nested run per stage.

Everything goes through explicit run ids (``MlflowClient``) so nothing depends on the fluent
active-run stack, except where an MLflow API insists on an active run (``log_model``): there the
stage run is activated for the duration of the stage (``activate_stage_run``).

Against a tracking server (``RLHF_TRACKING_URI=http(s)://...``) several processes and machines share
one store: new experiments take the server's proxied artifact location (``mlflow-artifacts:/``), so
no machine writes artifacts to a path only it can see, and every HTTP call is retried long enough
(``HTTP_RETRY_DEFAULTS``) to outlive a server restart.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.utils.time import get_current_time_millis

import rlhf_core
from rlhf_core.locked_initialization import initialize_once
from rlhf_core.settings import RLHFSettings

MAX_PARAM_LENGTH = 6000
DEFAULT_UI_URL = "http://127.0.0.1:5000"  # where ``rlhf ui`` serves the MLflow UI by default
SQLITE_PREFIX = "sqlite:///"
PACKAGE_VERSION_TAG = "rlhf.package_version"
DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows (and edits) as a run's description
# The MLflow 3 UI opens an experiment in its GenAI view (traces) unless the experiment says otherwise.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# ``workflowType`` picks the UI's model-training view (sidebar with the Model Registry) for any page.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
HTTP_PREFIXES = ("http://", "https://")
# Where MLflow keeps what a stage outputs; refs with these URIs resolve on any machine that reaches the
# tracking server. ``mlflow-artifacts:/`` (proxied artifacts) has no ``//``.
MLFLOW_URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")
# MLflow's HTTP client retries every method (POST included) on connection errors, timeouts, 429 and
# 5xx, sleeping factor * 2**(n-1) s (capped at 120 s; none before the first retry) plus up to ``JITTER``
# s. Ten retries with factor 1 (MLflow's defaults: 7 and 2) try at ~0, 2, 6, 14, 30, 62, 126 s, ...:
# ~8 minutes in all, and a server back within ~30 s is reached by the try at ~30 s.
# Applied with ``os.environ.setdefault``: what the user set wins.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10",  # MLflow refuses more than 10
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # an integer in MLflow
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",  # seconds per try (a read, not a whole upload)
}

_log = logging.getLogger(__name__)


def configure(settings: RLHFSettings) -> None:
    """Point MLflow at the tracking store of these settings (SQLite under the home dir by default)."""
    settings.resolved_home().mkdir(parents=True, exist_ok=True)
    uri = settings.resolved_tracking_uri()
    apply_http_retry_defaults()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith(SQLITE_PREFIX):
        initialize_sqlite_store(Path(uri.removeprefix(SQLITE_PREFIX)), uri)


def apply_http_retry_defaults() -> None:
    """``HTTP_RETRY_DEFAULTS`` into the environment, unless set; MLflow reads them on every request."""
    for key, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)


def is_tracking_server(uri: str) -> bool:
    """Whether ``uri`` is an MLflow tracking server (shared by processes and machines over HTTP)."""
    return uri.startswith(HTTP_PREFIXES)


def is_artifact_uri(uri: str) -> bool:
    """Whether a ref's ``uri`` names stored artifacts (MLflow, ``file://``, ``s3://``...), not a local
    path or a hub name."""
    return uri.startswith(MLFLOW_URI_PREFIXES) or "://" in uri


def initialize_sqlite_store(db_path: Path, uri: str) -> None:
    """Create (migrate) a new SQLite store under an inter-process lock; a no-op once it is ready.

    MLflow builds a missing schema the first time a store object is made, with no lock: several
    pipelines started at once on a fresh home race through the migrations and all but one crash
    ("duplicate column name", "table ... already exists"). Here one process migrates while the
    others wait; ``<db>.ready`` records that it is done, so later runs skip the lock.
    """

    def create() -> str:
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        c.search_experiments(max_results=1)  # builds the tracking store: creates and migrates the schema
        c.search_registered_models(max_results=1)  # the registry store checks its tables too
        return f"mlflow {mlflow.__version__}\n"

    initialize_once(db_path, create)


def client() -> MlflowClient:
    return MlflowClient()


def experiment_artifact_location(name: str, settings: RLHFSettings) -> str | None:
    """Artifact root of a new experiment: ``RLHF_ARTIFACT_LOCATION/<name>`` when set; None against a
    tracking server (the server assigns ``mlflow-artifacts:/<id>`` and proxies every upload and
    download); else ``<home>/mlartifacts/<name>`` beside the local store."""
    if settings.artifact_location:
        return f"{settings.artifact_location.rstrip('/')}/{name}"
    if is_tracking_server(settings.resolved_tracking_uri()):
        return None
    return f"{settings.resolved_artifact_location()}/{name}"


def ensure_experiment(name: str, settings: RLHFSettings) -> str:
    """Experiment id for a pipeline name, created with ``experiment_artifact_location`` if missing.

    The experiment is marked as model development (``mlflow.experimentKind``), so the MLflow UI opens it
    on its runs, not on the GenAI traces view; a kind someone already set is left alone.
    """
    c = client()
    experiment = c.get_experiment_by_name(name)
    if experiment is None:
        return c.create_experiment(
            name,
            artifact_location=experiment_artifact_location(name, settings),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    _warn_if_local_artifacts_on_server(experiment, settings)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        c.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def _warn_if_local_artifacts_on_server(experiment, settings: RLHFSettings) -> None:
    """An experiment made earlier with a ``file:`` artifact root keeps it: through a tracking server,
    each client would then write artifacts to its own disk, which other machines cannot read."""
    location = experiment.artifact_location or ""
    if is_tracking_server(settings.resolved_tracking_uri()) and location.startswith(("file:", "/")):
        _log.warning(
            "experiment '%s' stores artifacts at %s, a local path: other machines cannot read them. "
            "Use a new pipeline name (its experiment gets the server's proxied artifact store), or set "
            "RLHF_ARTIFACT_LOCATION to storage every machine reaches.",
            experiment.name,
            location,
        )


def git_commit(cwd: Path | None = None) -> str:
    """Commit of the working tree the pipeline runs from ('unknown' outside git); '+dirty' if modified."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def package_version() -> str:
    """Version of the installed ``rlhf-pipelines`` code: lineage that holds outside a git checkout too."""
    try:
        return importlib.metadata.version("rlhf-pipelines")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return rlhf_core.__version__


def start_pipeline_run(experiment_id: str, spec_name: str, tags: dict[str, str]) -> str:
    run = client().create_run(
        experiment_id,
        run_name=f"{spec_name}-pipeline",
        tags={"rlhf.run_type": "pipeline", PACKAGE_VERSION_TAG: package_version(), **tags},
    )
    return run.info.run_id


def start_stage_run(experiment_id: str, parent_run_id: str, stage: str, tags: dict[str, str]) -> str:
    run = client().create_run(
        experiment_id,
        run_name=stage,
        tags={
            "mlflow.parentRunId": parent_run_id,
            "rlhf.run_type": "stage",
            "rlhf.stage": stage,
            PACKAGE_VERSION_TAG: package_version(),
            **tags,
        },
    )
    return run.info.run_id


def reopen_run(run_id: str, tags: dict[str, str]) -> None:
    """Mark an interrupted stage run as running again (it is being resumed) by this package version."""
    c = client()
    c.update_run(run_id, status="RUNNING")
    for key, value in {PACKAGE_VERSION_TAG: package_version(), **tags}.items():
        c.set_tag(run_id, key, value)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    c = client()
    for key, value in tags.items():
        c.set_tag(run_id, key, value)


def set_description(run_id: str, markdown: str) -> None:
    """The run's description in the MLflow UI (markdown)."""
    client().set_tag(run_id, DESCRIPTION_TAG, markdown)


def ui_base_url(settings: RLHFSettings) -> str:
    """Where the MLflow UI of these settings' store is served: ``RLHF_MLFLOW_UI_URL``, else the tracking
    server itself when the tracking URI is one (it serves the UI), else ``rlhf ui``'s default address."""
    configured = os.environ.get("RLHF_MLFLOW_UI_URL")
    if configured:
        return configured.rstrip("/")
    uri = settings.resolved_tracking_uri()
    if is_tracking_server(uri):
        return uri.rstrip("/")
    return DEFAULT_UI_URL


def run_page(experiment_id: str, run_id: str) -> str:
    """The UI route (after ``#``) of a run's page; relative, so it works in a run description as a link."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def model_version_page(name: str, version: str) -> str:
    """The UI route (after ``#``) of a registered model version's page."""
    return f"#/models/{quote(name, safe='')}/versions/{version}"


def ui_url(base: str, page: str = "#/") -> str:
    """An absolute MLflow UI link that opens in the model-training view."""
    return f"{base.rstrip('/')}/{page}{'&' if '?' in page else '?'}{MODEL_TRAINING_VIEW}"


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log a nested config as flat dotted params (values JSON-encoded when not scalar)."""
    flat = flatten(params)
    existing = client().get_run(run_id).data.params
    batch = [Param(k, v[:MAX_PARAM_LENGTH]) for k, v in flat.items() if k not in existing]
    for i in range(0, len(batch), 100):
        client().log_batch(run_id, params=batch[i : i + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int) -> None:
    now = get_current_time_millis()
    client().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(run_id, text, artifact_file)


def log_dict(run_id: str, data: dict, artifact_file: str) -> None:
    client().log_dict(run_id, data, artifact_file)


def log_artifacts(run_id: str, local_dir: Path, artifact_path: str) -> str:
    """Upload a directory; returns the artifact URI it now lives at."""
    c = client()
    c.log_artifacts(run_id, str(local_dir), artifact_path)
    return f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}"


def log_table(run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
    if rows:
        client().log_table(
            run_id, data={k: [r.get(k) for r in rows] for k in rows[0]}, artifact_file=artifact_file
        )


@contextmanager
def activate_stage_run(run_id: str) -> Iterator[None]:
    """Make ``run_id`` the active fluent run of this thread (for APIs such as ``log_model``)."""
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None, log_system_metrics=False):
        yield


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out
