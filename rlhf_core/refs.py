"""Typed references exchanged between stages: small frozen records, never live objects.

A stage returns a ref; the next stage resolves it to files. Refs are what Prefect passes between
tasks and what the cache stores, so they must stay small and JSON-serialisable.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

# outcome: (prompt, completion, correct) rows for outcome reward models; step_labels: solutions split
# into steps with a label per step, for process reward models (book ch.5).
DatasetKind = Literal[
    "sft", "preference", "prompts", "completions", "unpaired_preference", "outcome", "step_labels"
]
# judge: a causal LM fine-tuned to give verdicts (a generative reward model, book ch.5)
ModelRole = Literal["policy", "reward", "value", "judge"]
DATASET_KINDS: tuple[str, ...] = get_args(DatasetKind)
MODEL_ROLES: tuple[str, ...] = get_args(ModelRole)


class _Ref(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetRef(_Ref):
    """A dataset with named splits (``train``, ``eval``, ...) stored as JSONL files under ``uri``."""

    type: Literal["dataset"] = "dataset"

    uri: str = Field(description="Where the split files live: a local directory or an MLflow artifact URI.")
    digest: str = Field(description="sha256 over the split files; changes whenever any row changes.")
    kind: DatasetKind = Field(description="Record schema of every row.")
    splits: dict[str, int] = Field(description="Split name -> number of rows.")
    columns: tuple[str, ...] = Field(description="Columns present in every row.")
    stage: str = Field(description="Stage that produced the dataset.")
    run_id: str | None = Field(default=None, description="MLflow run that logged the dataset.")

    @property
    def rows(self) -> int:
        return sum(self.splits.values())


class ModelRef(_Ref):
    """A saved causal LM (safetensors + tokenizer + chat template) loadable with ``from_pretrained``."""

    type: Literal["model"] = "model"

    uri: str = Field(description="Local directory, MLflow model URI or hub name of the weights.")
    revision: str | None = Field(default=None, description="Hub revision when ``uri`` is a hub name.")
    digest: str = Field(description="sha256 over weights and tokenizer files (hub models: name@revision).")
    role: ModelRole = Field(default="policy", description="What the model is for.")
    tokenizer_digest: str = Field(description="sha256 over the tokenizer files incl. the chat template.")
    stage: str = Field(description="Stage (or models: entry) that produced the model.")
    base_model: str = Field(description="Root base model this one descends from.")
    run_id: str | None = Field(default=None, description="MLflow run that trained/logged the model.")
    registered_name: str | None = Field(default=None, description="MLflow Model Registry name.")
    registered_version: str | None = Field(default=None, description="MLflow Model Registry version.")
    max_positions: int | None = Field(
        default=None, description="Longest sequence the model accepts (max_position_embeddings), if known."
    )


class EvalReportRef(_Ref):
    """Metrics of an evaluate stage, per evaluated model."""

    type: Literal["eval_report"] = "eval_report"

    stage: str = Field(description="Stage that produced the report.")
    metrics: dict[str, dict[str, float]] = Field(description="Model stage name -> metric name -> value.")
    digest: str = Field(default="", description="sha256 over the metrics; filled in from them when empty.")
    run_id: str | None = Field(default=None, description="MLflow run that logged the report.")

    @model_validator(mode="before")
    @classmethod
    def _digest_from_metrics(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("digest"):
            payload = json.dumps(data.get("metrics", {}), sort_keys=True)
            data = {**data, "digest": hashlib.sha256(payload.encode()).hexdigest()}
        return data


class PromotionRef(_Ref):
    """The decision of a promote stage: whether the gate passed and where the alias points now."""

    type: Literal["promotion"] = "promotion"

    stage: str = Field(description="Stage that took the decision.")
    registered_name: str = Field(description="Registered model the gate was about.")
    registered_version: str = Field(description="The candidate version.")
    alias: str = Field(description="Alias the gate moves (e.g. champion).")
    passed: bool = Field(description="Whether every gate condition held (the alias moved).")
    reason: str = Field(description="One line: the conditions that failed, or the figures that passed.")
    previous_version: str | None = Field(
        default=None, description="Version that held the alias before (now the previous-champion alias)."
    )
    run_id: str | None = Field(default=None, description="MLflow run of the promote stage.")


StageOutput = Annotated[DatasetRef | ModelRef | EvalReportRef | PromotionRef, Field(discriminator="type")]
