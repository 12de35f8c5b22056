"""The ``dataset`` stage: rows from a synthetic task, a local file or a hub dataset."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf_core.spec.base import StageSpec, Strict, check_split_fractions
from rlhf_core.spec.local_paths import LocalDataPath
from rlhf_core.spec.references import RefType, dataset_output

RecordFormat = Literal["sft", "preference", "prompts", "unpaired_preference"]
OUTPUT_NAME_OF_FORMAT = {
    "sft": "sft",
    "preference": "preferences",
    "prompts": "prompts",
    "unpaired_preference": "unpaired_preferences",
}


class SyntheticSource(Strict):
    """A deterministic synthetic task with a verifiable answer; emits sft, preferences and prompts."""

    task: Literal["arithmetic"] = Field(default="arithmetic", description="Name of the synthetic task.")
    n: int = Field(default=2000, ge=2, description="Number of problems generated.")
    max_operand: int = Field(default=20, ge=1, description="Largest operand of a problem.")
    operations: tuple[Literal["+", "-", "*"], ...] = Field(default=("+", "-"), description="Operators used.")


class FileSource(Strict):
    """Rows from a local JSONL, JSON or Parquet file (or a datasets save_to_disk directory)."""

    path: LocalDataPath = Field(
        description="Path of the file, relative to the spec file's directory or absolute."
    )
    format: RecordFormat = Field(description="Record schema of the rows.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Our column name -> the file's column name, e.g. {prompt: question}.",
    )


class HubSource(Strict):
    """Rows from a Hugging Face hub dataset through ``datasets.load_dataset``."""

    hub: str = Field(description="Dataset name on the hub.")
    config: str | None = Field(default=None, description="Dataset configuration name.")
    split: str = Field(default="train", description="Split to read.")
    revision: str | None = Field(default=None, description="Dataset revision.")
    format: RecordFormat = Field(description="Record schema of the rows.")
    columns: dict[str, str] = Field(default_factory=dict, description="Our column name -> their column name.")
    limit: int | None = Field(default=None, ge=1, description="Read at most this many rows.")


class DataSourceChoice(Strict):
    """Exactly one of ``synthetic``, ``file`` or ``hub``."""

    synthetic: SyntheticSource | None = Field(default=None, description="Offline synthetic task.")
    file: FileSource | None = Field(default=None, description="Local file.")
    hub: HubSource | None = Field(default=None, description="Hub dataset.")

    @model_validator(mode="after")
    def _exactly_one(self) -> DataSourceChoice:
        chosen = [k for k in ("synthetic", "file", "hub") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(f"give exactly one of synthetic, file or hub (got {chosen or 'none'})")
        return self

    def outputs(self) -> dict[str, str]:
        """Output name -> dataset kind this source provides."""
        if self.synthetic:
            return {"sft": "sft", "preferences": "preference", "prompts": "prompts"}
        fmt = (self.file or self.hub).format  # type: ignore[union-attr]
        return {OUTPUT_NAME_OF_FORMAT[fmt]: fmt}


class DatasetStage(StageSpec):
    """Prepare data: load or generate rows, validate them, split them, store them as JSONL."""

    kind: Literal["dataset"]
    source: DataSourceChoice = Field(description="Where the rows come from.")
    splits: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.9, "eval": 0.1},
        description="Split name -> fraction of rows; fractions must sum to 1.",
    )
    on_error: Literal["fail", "skip"] = Field(
        default="fail", description="Bad rows: 'fail' stops the stage, 'skip' drops them and counts them."
    )

    outputs: ClassVar[dict[str, RefType]] = {}  # depend on the source: see output_types

    @model_validator(mode="after")
    def _splits_sum_to_one(self) -> DatasetStage:
        check_split_fractions(self.splits)
        return self

    def output_types(self) -> dict[str, RefType]:
        return {name: dataset_output(kind) for name, kind in self.source.outputs().items()}
