"""The ``dataset`` stage's work: read or generate rows, validate them, split them, write them.

Stage code: it reads the stage's spec (its source, splits and ``on_error``), so it sits above the
spec, over the plain-value helpers of :mod:`rlhf_core.data`.

Entry point: :func:`prepare_dataset` (``run(stage, inputs, env)``; the stage reads no inputs).
Output layout: ``<env.work_dir>/data/<output name>/<split>.jsonl`` for each output of the source. A file
or hub source has one output, named after its format (``sft``, ``preferences``, ``prompts``,
``unpaired_preferences``); synthetic sources emit ``sft``, ``preferences`` and ``prompts`` from the same
problems, so their splits line up: the eval prompts are the eval conversations' questions. Rows are
written in the shape they came in (see :mod:`rlhf_core.data.schemas` for the accepted shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rlhf_core.data.loading import directory_digest, load_records, split_records, write_jsonl
from rlhf_core.data.schemas import validate_records
from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.errors import UserError
from rlhf_core.spec import DatasetStage
from rlhf_core.stage_environment import NoInputs, StageEnvironment
from rlhf_core.stage_results import StageResult


@dataclass
class PreparedOutput:
    kind: str
    directory: Path
    digest: str
    splits: dict[str, int]
    columns: tuple[str, ...]


@dataclass
class PreparedData(StageResult):
    outputs: dict[str, PreparedOutput]
    problems: list[str] = field(default_factory=list)  # one line per rejected row

    def summary(self) -> dict[str, float]:
        """Rows per output (all splits) and the rows rejected."""
        rows = {f"{name}_rows": float(sum(out.splits.values())) for name, out in self.outputs.items()}
        return rows | {"rejected_rows": float(len(self.problems))}


def read_source_rows(stage: DatasetStage, seed: int) -> dict[str, tuple[str, list[dict]]]:
    """Output name -> (kind, rows) before validation and splitting."""
    source = stage.source
    if source.synthetic is not None:
        syn = source.synthetic
        kwargs = {"max_operand": syn.max_operand, "operations": tuple(syn.operations)}
        return {
            name: (kind, synthetic_records(syn.task, kind, syn.n, seed, **kwargs))
            for name, kind in source.outputs().items()
        }
    if source.file is not None:
        f = source.file
        rows = load_records(f.path, fmt=f.format, column_map=f.columns)
        return {name: (kind, rows) for name, kind in source.outputs().items()}
    hub = source.hub
    assert hub is not None
    rows = load_records(
        hub.hub,
        fmt=hub.format,
        column_map=hub.columns,
        split=hub.split,
        hub_config=hub.config,
        revision=hub.revision,
        limit=hub.limit,
    )
    return {name: (kind, rows) for name, kind in source.outputs().items()}


def prepare_dataset(stage: DatasetStage, inputs: NoInputs, env: StageEnvironment) -> PreparedData:
    """Validate and split every output of the stage's source into ``<env.work_dir>/data``; returns
    digests and counts."""
    stage_name, seed, out_dir = env.stage, env.seed, env.work_dir / "data"
    result = PreparedData(outputs={})
    for name, (kind, rows) in read_source_rows(stage, seed).items():
        valid, problems = validate_records(
            rows, kind, source=f"stage '{stage_name}' ({name})", on_error=stage.on_error
        )
        result.problems += problems
        if not valid:
            raise UserError(f"stage '{stage_name}': no valid {kind} rows left ({len(problems)} rejected)")
        splits = split_records(valid, dict(stage.splits), seed)
        directory = out_dir / name
        for split, split_rows in splits.items():
            write_jsonl(split_rows, directory / f"{split}.jsonl")
        columns = tuple(sorted(set.intersection(*(set(r) for r in valid))))
        result.outputs[name] = PreparedOutput(
            kind, directory, directory_digest(directory), {s: len(r) for s, r in splits.items()}, columns
        )
    return result
