"""The ``dataset`` stage's work: read or generate rows, validate them, split them, write them.

Stage code: it reads the stage's spec (its source, splits and ``on_error``), so it sits above the
spec, over the plain-value helpers of :mod:`rlhf_core.data`.

Entry point: :func:`prepare_dataset` (``run(stage, inputs, env)``; the stage reads no inputs).
Output layout: ``<env.work_dir>/data/<output name>/<split>.jsonl`` for each output of the source. A file
or hub source read in a ``format`` has one output, named after it (``sft``, ``preferences``, ``prompts``,
``unpaired_preferences``); one read as a ``task`` (:mod:`rlhf_core.data.task_presets`) emits ``prompts``
and ``sft`` from the same rows, and synthetic sources emit ``sft``, ``preferences`` and ``prompts`` from
the same problems: their splits line up (one seed, the same rows), so the eval prompts are the eval
conversations' questions. Rows are written in the shape they came in, every source column kept (see
:mod:`rlhf_core.data.schemas` for the accepted shapes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_core.data.loading import directory_digest, load_records, read_rows, split_records, write_jsonl
from rlhf_core.data.schemas import prompt_key, validate_records
from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.data.task_presets import task_rows
from rlhf_core.environments.tool_arithmetic import tool_arithmetic_records
from rlhf_core.errors import UserError
from rlhf_core.spec import DatasetStage, FileSource, HubSource
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


def _read_options(source: FileSource | HubSource) -> dict:
    """Keyword arguments of :func:`read_rows` for the source: a hub dataset's split, config and limit."""
    if isinstance(source, FileSource):
        return {}
    return {
        "split": source.split,
        "hub_config": source.config,
        "revision": source.revision,
        "limit": source.limit,
    }


def _source_name(source: FileSource | HubSource) -> str:
    return str(source.path) if isinstance(source, FileSource) else source.hub


def read_source_rows(
    stage: DatasetStage, seed: int, *, stage_name: str = "dataset"
) -> tuple[dict[str, tuple[str, list[dict]]], list[str]]:
    """Output name -> (kind, rows) before validation and splitting, and the rows a task preset
    rejected (one line each; with ``on_error: fail`` the first one raises instead)."""
    source = stage.source
    if source.synthetic is not None:
        syn = source.synthetic
        kwargs = {"max_operand": syn.max_operand, "operations": tuple(syn.operations)}
        if syn.task == "tool_arithmetic":  # the tool-use task lives with the environments (book ch.13)
            kwargs["min_operand"] = syn.min_operand
            make = tool_arithmetic_records
        else:
            make = functools.partial(synthetic_records, syn.task)
        outputs = {name: (kind, make(kind, syn.n, seed, **kwargs)) for name, kind in source.outputs().items()}
        return outputs, []
    chosen = source.file or source.hub
    assert chosen is not None
    name, options = _source_name(chosen), _read_options(chosen)
    if chosen.task is None:
        rows = load_records(name, fmt=chosen.format, column_map=chosen.columns, **options)
        return {output: (kind, rows) for output, kind in source.outputs().items()}, []
    rows, columns = read_rows(name, **options)
    by_kind, problems = task_rows(
        rows, chosen.task, columns=chosen.columns, on_error=stage.on_error, available=columns,
        source=f"stage '{stage_name}' ({name}, task {chosen.task})",
    )  # fmt: skip
    return {output: (kind, by_kind[kind]) for output, kind in source.outputs().items()}, problems


# Kinds whose rows of one prompt stay in one split: an outcome model's held-out top-1 and pairwise
# accuracy compare the completions of a prompt, and a prompt seen in training must not be held out.
PROMPT_GROUPED_KINDS = ("outcome",)


def _split_by_prompt(rows: list[dict], fractions: dict[str, float], seed: int) -> dict[str, list[dict]]:
    """Split the distinct prompts (as :func:`split_records` splits rows) and send every row to its prompt's
    split, in the rows' order; split sizes count prompts, not rows."""
    keys = [prompt_key(row["prompt"]) for row in rows]
    distinct = list(dict.fromkeys(keys))
    split_of = {
        key["key"]: name
        for name, part in split_records([{"key": k} for k in distinct], fractions, seed).items()
        for key in part
    }
    splits: dict[str, list[dict]] = {name: [] for name in fractions}
    for row, key in zip(rows, keys, strict=True):
        splits[split_of[key]].append(row)
    return splits


def prepare_dataset(stage: DatasetStage, inputs: NoInputs, env: StageEnvironment) -> PreparedData:
    """Validate and split every output of the stage's source into ``<env.work_dir>/data``; returns
    digests and counts."""
    stage_name, seed, out_dir = env.stage, env.seed, env.work_dir / "data"
    outputs, rejected = read_source_rows(stage, seed, stage_name=stage_name)
    result = PreparedData(outputs={}, problems=rejected)
    for name, (kind, rows) in outputs.items():
        valid, problems = validate_records(
            rows, kind, source=f"stage '{stage_name}' ({name})", on_error=stage.on_error
        )
        result.problems += problems
        if not valid:
            rejected_rows = len(result.problems)
            raise UserError(f"stage '{stage_name}': no valid {kind} rows left ({rejected_rows} rejected)")
        splits = (
            _split_by_prompt(valid, dict(stage.splits), seed)
            if kind in PROMPT_GROUPED_KINDS
            else split_records(valid, dict(stage.splits), seed)
        )
        directory = out_dir / name
        for split, split_rows in splits.items():
            write_jsonl(split_rows, directory / f"{split}.jsonl")
        columns = tuple(sorted(set.intersection(*(set(r) for r in valid))))
        result.outputs[name] = PreparedOutput(
            kind, directory, directory_digest(directory), {s: len(r) for s, r in splits.items()}, columns
        )
    return result
