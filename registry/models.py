"""Models in MLflow: logging, Model Registry versions with lineage tags, aliases, loading back.

A trained model is logged with the transformers flavor (as a text-generation pipeline), so
``mlflow.transformers.load_model("models:/<name>@candidate")`` gives a pipeline that generates text.
Inside the artifacts, ``model/`` and ``components/tokenizer/`` are plain ``save_pretrained`` directories;
``materialize_model`` assembles them into one local directory for the next stage.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import mlflow
import transformers
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    ALREADY_EXISTS,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

from registry.tracking import (
    PACKAGE_VERSION_TAG,
    activate_stage_run,
    client,
    is_artifact_uri,
    package_version,
)
from rlhf_core.refs import ModelRef

CANDIDATE_ALIAS = "candidate"
# Requirements recorded with each model; passing them also skips MLflow's slow inference probe.
PIP_REQUIREMENTS = [
    f"torch=={transformers.utils.import_utils.get_torch_version()}",
    f"transformers=={transformers.__version__}",
    "tokenizers",
    "safetensors",
]


PIPELINE_TASK_OF_ROLE = {
    "policy": "text-generation",
    "reward": "text-classification",
    "judge": "text-generation",  # a causal LM answering with verdicts
}


def log_and_register_model(
    run_id: str,
    model,
    tokenizer,
    registered_name: str,
    lineage: dict[str, str],
    role: str = "policy",
    logged_name: str | None = None,
) -> tuple[str, str]:
    """Log ``model`` in the stage run, register a version tagged with ``lineage``, alias it ``candidate``.

    The version is also tagged with the package version (``rlhf.package_version``). Policies are logged
    as text-generation pipelines, reward models as text-classification ones (the scalar head's raw
    score). The logged model is named after its stage (``logged_name``, default the ``rlhf.stage``
    lineage tag), which is how the run's and the experiment's model lists show it; the name is not
    part of its artifact paths. Returns (logged model URI ``models:/m-...``, registered version).

    Idempotent per stage run: a run that already registered a version of ``registered_name`` (an
    earlier attempt that died after registering, e.g. resumed or retried) reuses it, and a version
    created twice by a retried request is removed again (``register_version``). Tags and the alias
    are set whatever happened before, so they are complete after any retry.
    """
    existing = versions_of_run(registered_name, run_id)
    if existing:
        version = existing[0]
        model_uri = version.source
    else:
        model_uri = _log_model(run_id, model, tokenizer, role, logged_name or lineage.get("rlhf.stage"))
        version = register_version(registered_name, model_uri, run_id)
    number = str(version.version)
    c = client()
    for key, value in {PACKAGE_VERSION_TAG: package_version(), **lineage}.items():
        c.set_model_version_tag(registered_name, number, key, value)
    c.set_registered_model_alias(registered_name, CANDIDATE_ALIAS, number)
    return model_uri, number


def _log_model(run_id: str, model, tokenizer, role: str, logged_name: str | None) -> str:
    """Log a transformers pipeline in the run (no registration); returns its ``models:/m-...`` URI."""
    pipeline = transformers.pipeline(PIPELINE_TASK_OF_ROLE[role], model=model, tokenizer=tokenizer)
    # MLflow looks up a hub model card and license by the model's local path: noise offline.
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    with activate_stage_run(run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.transformers.log_model(
            pipeline, name=logged_name or "model", pip_requirements=PIP_REQUIREMENTS
        )
    return info.model_uri


def versions_of_run(registered_name: str, run_id: str) -> list[ModelVersion]:
    """Versions of ``registered_name`` registered from ``run_id``, oldest first."""
    c = client()
    try:
        found = c.search_model_versions(f"name = '{registered_name}' and run_id = '{run_id}'")
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return []
        raise
    return sorted(found, key=lambda v: int(v.version))


def register_version(registered_name: str, model_uri: str, run_id: str) -> ModelVersion:
    """Register ``model_uri`` (logged in ``run_id``) as a new version of ``registered_name``, once.

    MLflow retries a POST whose answer was lost (server restart, proxy timeout), so the server may
    apply it twice. Any version from this run beyond the oldest one is deleted again; the oldest
    wins, so concurrent retries agree on it.
    """
    c = client()
    try:
        c.create_registered_model(registered_name)
    except MlflowException as exc:
        if exc.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
            raise
    c.create_model_version(registered_name, model_uri, run_id=run_id, model_id=_model_id(model_uri))
    kept, *duplicates = [v for v in versions_of_run(registered_name, run_id) if v.source == model_uri]
    for duplicate in duplicates:
        c.delete_model_version(registered_name, str(duplicate.version))
    return kept


def _model_id(model_uri: str) -> str | None:
    """``m-...`` of a ``models:/m-...`` logged-model URI (what links a version to its logged model)."""
    name = model_uri.removeprefix("models:/")
    return name if name.startswith("m-") and "/" not in name else None


def materialize_model(ref: ModelRef, cache_dir: Path) -> str:
    """A local ``save_pretrained``-style directory (weights + tokenizer) for ``ref``, or a hub name.

    Local directories and hub names are returned as they are; MLflow models are downloaded once into
    ``cache_dir/<digest>``.
    """
    if not is_artifact_uri(ref.uri):
        return ref.uri
    target = cache_dir / ref.digest[:32]
    if (target / "config.json").exists():
        return str(target)
    tmp = cache_dir / (ref.digest[:32] + ".download")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    root = Path(mlflow.artifacts.download_artifacts(ref.uri, dst_path=str(tmp)))
    flat = cache_dir / (ref.digest[:32] + ".flat")
    shutil.rmtree(flat, ignore_errors=True)
    flat.mkdir()
    for sub in ("model", "components/tokenizer"):
        for item in (root / sub).iterdir():
            os.replace(item, flat / item.name)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(flat, target)
    return str(target)


def model_version_tags(name: str, version: str) -> dict[str, str]:
    return dict(client().get_model_version(name, version).tags)
