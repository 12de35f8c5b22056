"""Datasets in MLflow: split files stored as run artifacts, logged as run inputs, downloaded on demand."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import InputTag

from registry.tracking import MLFLOW_URI_PREFIXES, client, is_artifact_uri
from rlhf_core.refs import DatasetRef


class MlflowArtifactsSource(DatasetSource):
    """A dataset kept as MLflow run artifacts (``mlflow-artifacts:/``, ``runs:/``), recorded by its URI.

    MLflow has no dataset source for these schemes (through a tracking server a dataset lives at
    ``mlflow-artifacts:/...``); without one the URI would be misread as a local path.
    """

    def __init__(self, uri: str):
        self.uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "mlflow_artifacts"

    def load(self, dst_path: str | None = None) -> str:
        return mlflow.artifacts.download_artifacts(artifact_uri=self.uri, dst_path=dst_path)

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return isinstance(raw_source, str) and raw_source.startswith(MLFLOW_URI_PREFIXES)

    @classmethod
    def _resolve(cls, raw_source: Any) -> MlflowArtifactsSource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, str]:
        return {"uri": self.uri}

    @classmethod
    def from_dict(cls, source_dict: dict) -> MlflowArtifactsSource:
        return cls(source_dict["uri"])


def log_dataset_input(run_id: str, ref: DatasetRef, context: str) -> None:
    """Record ``ref`` as an input of ``run_id`` (shown under the run's Datasets, with our digest)."""
    if ref.uri.startswith(MLFLOW_URI_PREFIXES):
        source = MlflowArtifactsSource(ref.uri)
    else:
        uri = ref.uri if is_artifact_uri(ref.uri) else Path(ref.uri).resolve().as_uri()
        with warnings.catch_warnings():  # "can be interpreted in multiple ways" for local file URIs
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
    dataset = MetaDataset(source=source, name=f"{ref.stage}.{ref.kind}", digest=ref.digest[:16])
    entity = dataset._to_mlflow_entity()
    client().log_inputs(
        run_id,
        datasets=[
            mlflow.entities.DatasetInput(dataset=entity, tags=[InputTag("mlflow.data.context", context)])
        ],
    )


def materialize_dataset(ref: DatasetRef, cache_dir: Path) -> Path:
    """Local directory holding ``<split>.jsonl`` files of ``ref`` (downloaded once per digest)."""
    if not is_artifact_uri(ref.uri):
        return Path(ref.uri)
    target = cache_dir / ref.digest[:32]
    if all((target / f"{split}.jsonl").exists() for split in ref.splits):
        return target
    tmp = cache_dir / (ref.digest[:32] + ".download")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=str(tmp)))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(local, target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target
