"""Evaluation figures attached to a logged model, so its registry version page shows them.

MLflow 3 keeps metrics per *logged model* (``models:/m-...``) as well as per run: the registry's version
page lists the metrics of the logged model behind the version. The ``evaluate`` stage logs each
evaluated model's figures there (``eval/accuracy``, ``eval/accuracy_ci_low``, ...), under its own
run; the promotion gate, the model card and ``rlhf models list`` read them back.

A metric linked to a logged model is also a metric of the run that logs it, under the same key, so the
evaluate stage logs ``<model>/eval/accuracy`` (one key per evaluated model in its run, as for models
that are not registered); reading back strips the ``<model>/`` part: ``eval/accuracy``.
"""

from __future__ import annotations

from mlflow.entities import Metric
from mlflow.utils.time import get_current_time_millis

from registry.tracking import client

LOGGED_MODEL_PREFIX = "models:/m-"
FIGURE_PREFIX = "eval/"


def logged_model_id(model_uri: str) -> str | None:
    """``m-...`` of a logged-model URI (``models:/m-...``); None for anything else (local dirs, hub names)."""
    if not model_uri.startswith(LOGGED_MODEL_PREFIX):
        return None
    return model_uri.removeprefix("models:/").split("/", 1)[0]


def log_model_metrics(run_id: str, model_uri: str, metrics: dict[str, float]) -> bool:
    """Log ``metrics`` under ``run_id`` linked to the logged model of ``model_uri``; False if it has none."""
    model_id = logged_model_id(model_uri)
    if model_id is None or not metrics:
        return False
    now = get_current_time_millis()
    batch = [Metric(k, float(v), now, 0, model_id=model_id, run_id=run_id) for k, v in metrics.items()]
    for i in range(0, len(batch), 500):
        client().log_batch(run_id, metrics=batch[i : i + 500])
    return True


def model_metrics(model_uri: str) -> dict[str, float]:
    """The newest value of every metric logged against the logged model of ``model_uri`` ({} if none)."""
    model_id = logged_model_id(model_uri)
    if model_id is None:
        return {}
    newest: dict[str, Metric] = {}
    for metric in client().get_logged_model(model_id).metrics or []:
        if metric.key not in newest or metric.timestamp >= newest[metric.key].timestamp:
            newest[metric.key] = metric
    figures: dict[str, float] = {}
    for key, metric in sorted(newest.items(), key=lambda item: item[1].timestamp):
        figures[_figure_name(key)] = metric.value  # the newest wins when two keys name one figure
    return figures


def _figure_name(key: str) -> str:
    """``sft/eval/accuracy`` -> ``eval/accuracy``; keys without an ``eval/`` part stay as they are."""
    at = key.find(FIGURE_PREFIX)
    return key[at:] if at > 0 and key[at - 1] == "/" else key


def version_metrics(name: str, version: str) -> dict[str, float]:
    """Evaluation figures of a registered model version (those of its logged model)."""
    version_info = client().get_model_version(name, version)
    model_id = getattr(version_info, "model_id", None)
    return model_metrics(f"models:/{model_id}" if model_id else version_info.source or "")


def measuring_runs(name: str, version: str) -> list[str]:
    """The runs that logged figures against a registered version's logged model (its own run and each
    evaluation that measured it), oldest figure first."""
    version_info = client().get_model_version(name, version)
    model_id = getattr(version_info, "model_id", None) or logged_model_id(version_info.source or "")
    if model_id is None:
        return []
    metrics = sorted(client().get_logged_model(model_id).metrics or [], key=lambda m: m.timestamp)
    return list(dict.fromkeys(m.run_id for m in metrics if m.run_id))
