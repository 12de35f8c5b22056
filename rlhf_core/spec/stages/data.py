"""The ``dataset`` stage: rows from a synthetic task, a local file or a hub dataset."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf_core.data.task_presets import TaskName, preset_columns
from rlhf_core.spec.base import StageSpec, Strict, check_split_fractions
from rlhf_core.spec.local_paths import LocalDataPath
from rlhf_core.spec.references import RefType, dataset_output

RecordFormat = Literal["sft", "preference", "prompts", "unpaired_preference", "outcome", "step_labels"]
OUTPUT_NAME_OF_FORMAT = {
    "sft": "sft",
    "preference": "preferences",
    "prompts": "prompts",
    "unpaired_preference": "unpaired_preferences",
    "outcome": "outcomes",
    "step_labels": "step_labels",
}


class SyntheticSource(Strict):
    """A deterministic synthetic task with a verifiable answer; emits sft, preferences and prompts (task
    arithmetic also outcomes and step_labels: worked solutions, right or with a wrong step, labelled)."""

    task: Literal["arithmetic", "tool_arithmetic"] = Field(
        default="arithmetic",
        description="Name of the synthetic task: arithmetic (solutions in words), or tool_arithmetic (large "
        "operands; sft rows are calculator-tool trajectories, preferences trajectory pairs (calling the "
        "tool vs answering at once, wrong), prompts carry gold_tool_calls; book ch.13).",
    )
    n: int = Field(default=2000, ge=2, description="Number of problems generated.")
    max_operand: int = Field(default=20, ge=1, description="Largest operand of a problem.")
    min_operand: int = Field(default=0, ge=0, description="Smallest operand of a problem.")
    operations: tuple[Literal["+", "-", "*"], ...] = Field(default=("+", "-"), description="Operators used.")

    @model_validator(mode="after")
    def _operand_range(self) -> SyntheticSource:
        if self.min_operand > self.max_operand:
            raise ValueError(f"min_operand {self.min_operand} is above max_operand {self.max_operand}")
        if self.min_operand and self.task != "tool_arithmetic":
            raise ValueError("min_operand applies to task tool_arithmetic only")
        return self


_TASK_DESCRIPTION = (
    "A public dataset's own format, read with its standard columns; emits both a `prompts` output "
    "(every source column, plus `prompt` and what a verifier reads) and an `sft` output (the same rows "
    "plus the reference solution as `completion`). "
    "gsm8k reads question, answer ('...#### 72'): writes prompt, answer '72' (math_answer), solution, "
    "and as completion the worked solution without its <<48/2=24>> notes. "
    "math reads problem, solution (with \\boxed{}): writes prompt, answer (the last box's content), "
    "solution; completion: the solution. "
    "mbpp reads text, test_list, test_setup_code (optional), code: writes prompt (the text, then 'Your "
    "code should pass these tests:' and the asserts), tests, setup (code_tests: "
    "{setup_column: setup}); completion: the code in a ```python fence. "
    "humaneval reads prompt (the stub), test, entry_point, canonical_solution: writes prompt (an "
    "instruction and the stub in a fence), stub, tests, entry_point (code_tests: {entry_point_column: "
    "entry_point}); completion: stub + solution in a ```python fence. "
    "A row without '####' or \\boxed{}, or with an empty test list, is a bad row (on_error)."
)
_FORMAT_DESCRIPTION = (
    "Record schema of the rows. With `task`: optional, and `prompts` or `sft` keeps only that output."
)
_COLUMNS_DESCRIPTION = (
    "Our column name -> theirs, e.g. {prompt: question}; theirs may be a path into a nested or list "
    "column, e.g. {answer: 'answers.text[0]'} (keys joined by dots, list items in brackets). A column "
    "mapped once is renamed, a path is copied; every other source column is kept. With `task`: the keys "
    "are the preset's roles (prompt, answer, tests, setup, entry_point, completion) and override single "
    "entries of its standard columns."
)


class _TaskOrFormat(Strict):
    """A file or hub source is read in a record ``format`` or as a public ``task``'s own rows."""

    format: RecordFormat | None = Field(default=None, description=_FORMAT_DESCRIPTION)
    task: TaskName | None = Field(default=None, description=_TASK_DESCRIPTION)
    columns: dict[str, str] = Field(default_factory=dict, description=_COLUMNS_DESCRIPTION)

    @model_validator(mode="after")
    def _format_or_task(self) -> _TaskOrFormat:
        if self.task is None:
            if self.format is None:
                raise ValueError(f"give a format ({', '.join(OUTPUT_NAME_OF_FORMAT)}) or a task")
            return self
        if self.format not in (None, "prompts", "sft"):
            raise ValueError(
                f"task {self.task!r} emits prompts and sft rows; format {self.format!r} is not one"
            )
        preset_columns(self.task, self.columns)  # unknown roles: ValueError naming the preset's roles
        return self

    def outputs(self) -> dict[str, str]:
        """Output name -> dataset kind."""
        if self.task is not None:
            kinds = (self.format,) if self.format else ("prompts", "sft")
            return {kind: kind for kind in kinds}
        assert self.format is not None
        return {OUTPUT_NAME_OF_FORMAT[self.format]: self.format}


class FileSource(_TaskOrFormat):
    """Rows from a local JSONL, JSON or Parquet file (or a datasets save_to_disk directory)."""

    path: LocalDataPath = Field(
        description="Path of the file, relative to the spec file's directory or absolute."
    )


class HubSource(_TaskOrFormat):
    """Rows from a Hugging Face hub dataset through ``datasets.load_dataset``."""

    hub: str = Field(description="Dataset name on the hub, e.g. openai/gsm8k.")
    config: str | None = Field(default=None, description="Dataset configuration name, e.g. main.")
    split: str = Field(default="train", description="Split to read.")
    revision: str | None = Field(default=None, description="Dataset revision.")
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
            base = {"sft": "sft", "preferences": "preference", "prompts": "prompts"}
            if self.synthetic.task == "arithmetic":  # worked solutions for outcome/process reward models
                return base | {"outcomes": "outcome", "step_labels": "step_labels"}
            return base
        return (self.file or self.hub).outputs()  # type: ignore[union-attr]


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
