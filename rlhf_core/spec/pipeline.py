"""The pipeline: base models plus a DAG of stages, and the checks on the graph they form.

The stage union is built from every registered stage kind (:data:`rlhf_core.spec.base.STAGE_CLASSES`),
so adding a kind is defining its class in :mod:`rlhf_core.spec.stages`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterator
from typing import Annotated, Any, Union

from pydantic import BaseModel, Field, model_validator

from rlhf_core.spec import stages as _stages  # noqa: F401  (defines every stage kind)
from rlhf_core.spec.base import NAME_PATTERN, NAME_RULE, STAGE_CLASSES, Strict
from rlhf_core.spec.compute import ComputeProfile, ComputeSpec
from rlhf_core.spec.models import ModelSource
from rlhf_core.spec.references import RefType, model_output, parse_ref

Stage = Annotated[Union[tuple(STAGE_CLASSES.values())], Field(discriminator="kind")]  # noqa: UP007
STAGE_KINDS = tuple(STAGE_CLASSES)
BASE_MODEL_TYPE = model_output("policy")


class PipelineSpec(Strict):
    """A whole post-training pipeline: base models plus a DAG of stages."""

    name: str = Field(pattern=NAME_PATTERN, description="Pipeline name; MLflow experiment and model prefix.")
    description: str = Field(default="", description="What the pipeline is for.")
    seed: int = Field(default=0, description="Default seed of every stage.")
    models: dict[str, ModelSource] = Field(default_factory=dict, description="Base models by name.")
    stages: dict[str, Stage] = Field(min_length=1, description="Stages by name; order does not matter.")

    @model_validator(mode="after")
    def _check_graph(self) -> PipelineSpec:
        problems = list(_name_problems(self))
        if not problems:
            problems = list(_reference_problems(self)) or _cycle_problems(self)
        if not problems:
            problems = list(gate_problems(self))
        problems += processes_problems(self)
        if not problems:
            problems = list(tokenizer_problems(self))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def stage_seed(self, stage_name: str) -> int:
        seed = self.stages[stage_name].seed
        return self.seed if seed is None else seed

    def dependencies(self, stage_name: str) -> list[str]:
        """Names of the stages and models a stage reads from, in field order."""
        refs = self.stages[stage_name].input_refs().values()
        return list(dict.fromkeys(parse_ref(ref)[0] for ref, _ in refs))

    def topological_order(self) -> list[str]:
        """Stage names so that every stage comes after the stages it depends on (stable by spec order)."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen or name not in self.stages:
                return
            seen.add(name)
            for dep in self.dependencies(name):
                visit(dep)
            order.append(name)

        for name in self.stages:
            visit(name)
        return order

    def downstream_of(self, stage_name: str) -> set[str]:
        """The stage itself and every stage that (transitively) depends on it."""
        result = {stage_name}
        for name in self.topological_order():
            if any(dep in result for dep in self.dependencies(name)):
                result.add(name)
        return result

    def digest(self) -> str:
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def registered_name(self, stage_name: str) -> str:
        """The Model Registry name of a stage's model: its ``register_as``, else '<pipeline>-<stage>'."""
        stage = self.stages.get(stage_name)
        return getattr(stage, "register_as", None) or f"{self.name}-{stage_name}"

    def with_profile(self, profile: ComputeProfile, profile_name: str = "") -> PipelineSpec:
        """This spec with every stage's ``compute`` as ``profile`` sets it (rlhf_core.spec.compute).

        A profile that names a stage or stage kind this spec does not have is an error (a typo would
        otherwise run that stage in the wrong place without a word).
        """
        from rlhf_core.spec.base import SpecError
        from rlhf_core.spec.compute import stage_compute

        label = f"profile '{profile_name}'" if profile_name else "profile"
        problems = [
            f"{label}, stages.{name}: no stage '{name}' in pipeline '{self.name}'"
            for name in profile.stages
            if name not in self.stages
        ] + [
            f"{label}, kinds.{kind}: unknown stage kind (known: {', '.join(sorted(STAGE_KINDS))})"
            for kind in profile.kinds
            if kind not in STAGE_KINDS
        ]
        if problems:
            raise SpecError(problems)
        stages = {
            name: stage.model_copy(
                update={"compute": stage_compute(stage.compute, profile, name, stage.kind)}
            )
            for name, stage in self.stages.items()
        }
        placed = self.model_copy(update={"stages": stages})
        problems = [f"{label}: {p}" for p in processes_problems(placed)]
        if problems:
            raise SpecError(problems)
        return placed

    def resolved(self, position_limits: dict[str, int] | None = None) -> PipelineSpec:
        """The effective spec: every stage with its defaults filled in (``StageSpec.resolved``), and
        ``max_length`` fields the file leaves out capped at the position limit of the models they read
        (``position_limits``: ``models:`` entry -> limit, where known). Idempotent."""
        stages = {}
        for name, stage in self.stages.items():
            stage = stage.resolved()
            limit = stage_position_limit(self, name, position_limits or {})
            if limit is not None:
                stage = cap_unwritten(stage, "max_length", limit)
            stages[name] = stage
        return self.model_copy(update={"stages": stages})

    def compute_of(self, stage_name: str) -> ComputeSpec:
        """Where a stage runs (its ``compute`` block; in-process when it has none)."""
        return self.stages[stage_name].compute or ComputeSpec()


def ref_type(spec: PipelineSpec, ref: str) -> tuple[RefType | None, str | None]:
    """(type of the referenced output, error message)."""
    name, output = parse_ref(ref)
    if name in spec.models:
        if output is not None:
            return None, f"model '{name}' has no outputs; refer to it as '{name}'"
        return BASE_MODEL_TYPE, None
    if name not in spec.stages:
        known = sorted([*spec.models, *spec.stages])
        return (
            None,
            f"unknown reference '{ref}': no model or stage named '{name}' (known: {', '.join(known)})",
        )
    outputs = spec.stages[name].output_types()
    if output is None:
        if len(outputs) == 1:
            return next(iter(outputs.values())), None
        return None, f"'{name}' has several outputs; pick one of: {', '.join(f'{name}.{o}' for o in outputs)}"
    if output not in outputs:
        return None, f"stage '{name}' has no output '{output}' (it has: {', '.join(outputs)})"
    return outputs[output], None


REGISTERED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def processes_problems(spec: PipelineSpec) -> list[str]:
    """``compute.processes`` > 1 on a stage whose kind trains in one process."""
    return [
        f"stage '{name}', field compute.processes: {problem}"
        for name, stage in spec.stages.items()
        if (problem := stage.processes_problem())
    ]


def tokenizer_problems(spec: PipelineSpec) -> Iterator[str]:
    """Models that must share a tokenizer (a teacher and its student) and cannot: descending from tiny
    models whose tokenizers are trained on other corpora or to other sizes, or from a tiny model (its
    tokenizer trained here) and a hub or local model. Other pairs are checked on their tokenizers when the
    stage starts."""
    for stage_name, stage in spec.stages.items():
        for field_path, (student_ref, teacher_ref) in stage.shared_tokenizer_refs().items():
            roots = [lineage_root(spec, ref) for ref in (student_ref, teacher_ref)]
            if None in roots:
                continue
            tiny = [spec.models[root].tiny for root in roots]  # type: ignore[index]
            if tiny == [None, None]:
                continue
            if None in tiny:
                why = "one descends from a tiny model (its tokenizer trained here), the other does not"
            else:
                recipe = [(t.vocab_size, t.tokenizer_corpus) for t in tiny]  # type: ignore[union-attr]
                if recipe[0] == recipe[1]:
                    continue
                why = (
                    f"their tiny base models train their tokenizers differently (student {roots[0]}: "
                    f"vocab_size {recipe[0][0]}, corpus {recipe[0][1]}; teacher {roots[1]}: vocab_size "
                    f"{recipe[1][0]}, corpus {recipe[1][1]})"
                )
            yield (
                f"stage '{stage_name}', field {field_path}: the teacher '{teacher_ref}' and the student "
                f"'{student_ref}' cannot share a tokenizer: {why}"
            )


def _name_problems(spec: PipelineSpec) -> Iterator[str]:
    """Stage and model names become directories, MLflow run names and registered-model names."""
    for name in spec.models:
        if not re.match(NAME_PATTERN, name):
            yield f"model {name!r}: invalid name; use {NAME_RULE}"
    for name in spec.stages:
        if not re.match(NAME_PATTERN, name):
            yield f"stage {name!r}: invalid name; use {NAME_RULE}"
        elif name in spec.models:
            yield f"stage '{name}': name is also used by a model under `models:`"
        elif not REGISTERED_NAME.match(spec.registered_name(name)):
            yield (
                f"stage '{name}', field register_as: {spec.registered_name(name)!r} is not a valid "
                "registered-model name; use 1-128 letters, digits, '_', '.' or '-'"
            )


def _reference_problems(spec: PipelineSpec) -> Iterator[str]:
    for stage_name, stage in spec.stages.items():
        for field_path, (ref, expected) in stage.input_refs().items():
            actual, error = ref_type(spec, ref)
            where = f"stage '{stage_name}', field {field_path}"
            if error:
                yield f"{where}: {error}"
            elif parse_ref(ref)[0] == stage_name:
                yield f"{where}: a stage cannot refer to itself"
            elif not expected.covers(actual):
                yield f"{where}: '{ref}' is {actual.describe()}, expected {expected.describe()}"


def gate_problems(spec: PipelineSpec) -> Iterator[str]:
    """A promote stage's candidate must be among the models its evaluation measures, and each gate
    metric a figure that evaluation reports for it (else the gate could only fail, after everything ran)."""
    for stage_name, stage in spec.stages.items():
        if stage.kind != "promote":
            continue
        evaluation_name = parse_ref(stage.evaluation)[0]
        evaluation = spec.stages[evaluation_name]
        if not hasattr(evaluation, "measured_figures"):
            continue  # not an evaluate stage: the reference check reports it
        candidate = _model_key(spec, stage.model)
        evaluated = {_model_key(spec, ref): ref for ref in evaluation.models}
        if candidate not in evaluated:
            yield (
                f"stage '{stage_name}', field model: '{stage.model}' is not among the models stage "
                f"'{evaluation_name}' evaluates ({', '.join(evaluation.models)}); add it to its models"
            )
            continue
        figures = evaluation.measured_figures(evaluated[candidate])
        names = {
            *figures,
            *(f"{n}{s}" for n, ci in figures.items() if ci for s in ("_ci_low", "_ci_high", "_n")),
        }
        for i, condition in enumerate(stage.gate):
            metric = condition.metric.removeprefix("eval/")
            if metric in names:
                continue
            close = difflib.get_close_matches(metric, names, n=1)
            listed = ", ".join(
                f"{n}{' (+ _ci_low, _ci_high, _n)' if ci else ''}" for n, ci in figures.items()
            )
            yield (
                f"stage '{stage_name}', field gate[{i}].metric: stage '{evaluation_name}' measures no "
                f"'{condition.metric}' for '{stage.model}'{f' (did you mean {close[0]}?)' if close else ''}; "
                f"it measures: {listed or 'nothing'}"
            )


def _model_key(spec: PipelineSpec, ref: str) -> tuple[str, str | None]:
    """A model reference as (name, output), with a stage's only output named (``sft`` == ``sft.model``)."""
    name, output = parse_ref(ref)
    if output is None and name in spec.stages:
        outputs = spec.stages[name].output_types()
        output = next(iter(outputs)) if len(outputs) == 1 else None
    return name, output


def _cycle_problems(spec: PipelineSpec) -> list[str]:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "active"
        path.append(name)
        for dep in spec.dependencies(name):
            if dep not in spec.stages:
                continue
            if state.get(dep) == "active":
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[name] = "done"
        path.pop()
        return None

    for name in spec.stages:
        if name not in state and (cycle := visit(name)):
            return [f"stage '{cycle[0]}': dependency cycle {' -> '.join(cycle)}"]
    return []


def lineage_root(spec: PipelineSpec, ref: str) -> str | None:
    """The ``models:`` entry a model reference descends from (through each stage's first model input)."""
    name = parse_ref(ref)[0]
    seen: set[str] = set()
    while name not in spec.models:
        if name in seen or name not in spec.stages:
            return None
        seen.add(name)
        models = [r for r, t in spec.stages[name].input_refs().values() if t.output == "model"]
        if not models:
            return None
        name = parse_ref(models[0])[0]
    return name


def stage_position_limit(spec: PipelineSpec, stage_name: str, limits: dict[str, int]) -> int | None:
    """The smallest known position limit of the base models a stage's model inputs descend from."""
    stage = spec.stages[stage_name]
    roots = {lineage_root(spec, ref) for ref, kind in stage.input_refs().values() if kind.output == "model"}
    known = [limits[root] for root in roots if root in limits]
    return min(known) if known else None


def position_limit_problems(spec: PipelineSpec, limits: dict[str, int]) -> list[str]:
    """``max_length`` fields written in the spec longer than the position limit of the base model a
    stage's models descend from; ``limits`` maps ``models:`` entries to their limits where known before
    anything runs. A default the file leaves out is no problem: it follows the model (``resolved``)."""
    problems: dict[str, None] = {}
    for stage_name, stage in spec.stages.items():
        lengths = length_fields(stage, "max_length")
        written = {path: value for path, (value, given) in lengths.items() if given}
        for ref, ref_kind in stage.input_refs().values():
            root = lineage_root(spec, ref) if ref_kind.output == "model" else None
            for path, value in written.items():
                if root in limits and value > limits[root]:
                    problems[
                        f"stage '{stage_name}', field {path}: {value}, as written in the spec, is longer "
                        f"than model '{root}' accepts (max_position_embeddings {limits[root]}); lower it, "
                        "or leave it out to use the model's limit"
                    ] = None
    return list(problems)


def length_fields(model: BaseModel, field_name: str, prefix: str = "") -> dict[str, tuple[Any, bool]]:
    """Field path -> (value, whether the spec wrote it) of every field ``field_name`` in ``model`` and its
    nested models; a field the file leaves out holds its default."""
    found: dict[str, tuple[Any, bool]] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if name == field_name and value is not None:
            found[f"{prefix}{name}"] = (value, name in model.model_fields_set)
        elif isinstance(value, BaseModel):
            found.update(length_fields(value, field_name, f"{prefix}{name}."))
    return found


def cap_unwritten(model: BaseModel, field_name: str, limit: int) -> Any:
    """``model`` with every ``field_name`` it leaves to its default lowered to ``limit`` where larger."""
    update: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if name == field_name and isinstance(value, int) and name not in model.model_fields_set:
            if value > limit:
                update[name] = limit
        elif isinstance(value, BaseModel):
            capped = cap_unwritten(value, field_name, limit)
            if capped is not value:
                update[name] = capped
    return model.model_copy(update=update) if update else model


def filled_defaults(written: BaseModel, resolved: BaseModel) -> dict[str, Any]:
    """Field path -> effective value, for every field whose value ``resolved`` filled in (``rlhf plan``)."""

    def flat(data: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(data, dict):
            return {prefix[:-1]: data}
        return {k: v for key, value in data.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    before, after = flat(written.model_dump(mode="json")), flat(resolved.model_dump(mode="json"))
    return {path: value for path, value in after.items() if before.get(path) != value}


def fields_named(model: BaseModel, field_name: str, prefix: str = "") -> dict[str, Any]:
    """Field path -> value of every field called ``field_name`` in ``model`` and its nested models."""
    found: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if name == field_name and value is not None:
            found[f"{prefix}{name}"] = value
        elif isinstance(value, BaseModel):
            found.update(fields_named(value, field_name, f"{prefix}{name}."))
    return found
