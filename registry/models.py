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

from registry.tracking import PACKAGE_VERSION_TAG, activate_stage_run, client, package_version
from rlhf_core.refs import ModelRef

CANDIDATE_ALIAS = "candidate"
# Requirements recorded with each model; passing them also skips MLflow's slow inference probe.
PIP_REQUIREMENTS = [
    f"torch=={transformers.utils.import_utils.get_torch_version()}",
    f"transformers=={transformers.__version__}",
    "tokenizers",
    "safetensors",
]


PIPELINE_TASK_OF_ROLE = {"policy": "text-generation", "reward": "text-classification"}


def log_and_register_model(
    run_id: str,
    model,
    tokenizer,
    registered_name: str,
    lineage: dict[str, str],
    role: str = "policy",
    logged_name: str | None = None,
) -> tuple[str, str]:
    """Log ``model`` in the stage run, register a new version tagged with ``lineage``, alias it ``candidate``.

    The version is also tagged with the package version (``rlhf.package_version``). Policies are logged
    as text-generation pipelines, reward models as text-classification ones (the scalar head's raw
    score). The logged model is named after its stage (``logged_name``, default the ``rlhf.stage``
    lineage tag), which is how the run's and the experiment's model lists show it; the name is not
    part of its artifact paths. Returns (logged model URI ``models:/m-...``, registered version).
    """
    pipeline = transformers.pipeline(PIPELINE_TASK_OF_ROLE[role], model=model, tokenizer=tokenizer)
    # MLflow looks up a hub model card and license by the model's local path: noise offline.
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    with activate_stage_run(run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.transformers.log_model(
            pipeline,
            name=logged_name or lineage.get("rlhf.stage") or "model",
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=registered_name,
            await_registration_for=60,
        )
    version = str(info.registered_model_version)
    c = client()
    for key, value in {PACKAGE_VERSION_TAG: package_version(), **lineage}.items():
        c.set_model_version_tag(registered_name, version, key, value)
    c.set_registered_model_alias(registered_name, CANDIDATE_ALIAS, version)
    return info.model_uri, version


def materialize_model(ref: ModelRef, cache_dir: Path) -> str:
    """A local ``save_pretrained``-style directory (weights + tokenizer) for ``ref``, or a hub name.

    Local directories and hub names are returned as they are; MLflow models are downloaded once into
    ``cache_dir/<digest>``.
    """
    if not ref.uri.startswith(("models:/", "runs:/")) and "://" not in ref.uri:
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
