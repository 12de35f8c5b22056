"""Typed references: spec fields that name another stage's output, and what that output must be.

A reference is text in the spec: ``base`` (a ``models:`` entry or a stage with one output) or
``stage.output`` (``data.sft``). A field says what it must point at through its type::

    model: PolicyModel = Field(description=...)        # a policy model
    data: SFTData = Field(description=...)              # an sft dataset
    models: tuple[PolicyModel, ...] = Field(...)        # several policy models

Generic code finds every reference a stage holds (nested models and tuples included) with
:func:`reference_fields`; the graph, the reference checks, a stage's inputs and its fingerprint all
come from there, so a stage kind never lists its inputs a second time. The kinds of models and
datasets are those of :mod:`rlhf_core.refs`.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from rlhf_core.refs import (
    DATASET_KINDS,
    MODEL_ROLES,
    DatasetRef,
    EvalReportRef,
    ModelRef,
    PromotionRef,
    StageOutput,
)

OutputClass = Literal["model", "dataset", "report", "promotion"]
T = TypeVar("T")


@dataclass(frozen=True)
class RefType:
    """What a reference points at: a model of a role, a dataset of a kind, or an evaluation report.

    ``kind`` may name several roles or kinds, ``("policy", "judge")``: a reference to any of them is
    accepted (a generative judge is a causal LM, so a field that prompts a model may take either)."""

    output: OutputClass
    kind: str | tuple[str, ...] | None = None  # model role(s) or dataset kind(s)

    def __post_init__(self) -> None:
        allowed = {"model": MODEL_ROLES, "dataset": DATASET_KINDS, "report": (None,), "promotion": (None,)}[
            self.output
        ]
        unknown = [k for k in self.kinds if k not in allowed]
        if unknown or (isinstance(self.kind, tuple) and len(self.kind) < 2):
            raise ValueError(f"{self.output} references take one or more of {allowed}, got {self.kind!r}")

    @property
    def kinds(self) -> tuple[str | None, ...]:
        """The roles or kinds accepted, as a tuple (``(None,)`` for reports and promotions)."""
        return self.kind if isinstance(self.kind, tuple) else (self.kind,)

    def __str__(self) -> str:
        return self.output if self.kind is None else f"{self.output}:{'|'.join(self.kinds)}"

    def describe(self) -> str:
        """Words for error messages: 'a policy model', 'an sft dataset', 'a policy or judge model'."""
        if self.output == "report":
            return "an evaluation report"
        if self.output == "promotion":
            return "a promotion decision"
        first = str(self.kinds[0])
        article = "an" if first == "sft" or first[0] in "aeiou" else "a"  # "an sft dataset"
        return f"{article} {' or '.join(str(k) for k in self.kinds)} {self.output}"

    def covers(self, other: RefType) -> bool:
        """Whether an output of type ``other`` (one role or kind) may be given where this type is asked."""
        return other.output == self.output and set(other.kinds) <= set(self.kinds)

    def accepts(self, ref: StageOutput) -> bool:
        """Whether a resolved output is of this type (checked again when the stage runs)."""
        if self.output == "model":
            return isinstance(ref, ModelRef) and ref.role in self.kinds
        if self.output == "dataset":
            return isinstance(ref, DatasetRef) and ref.kind in self.kinds
        if self.output == "report":
            return isinstance(ref, EvalReportRef)
        return isinstance(ref, PromotionRef)


def model_output(role: str) -> RefType:
    return RefType("model", role)


def dataset_output(kind: str) -> RefType:
    return RefType("dataset", kind)


REPORT = RefType("report")
PROMOTION = RefType("promotion")

PolicyModel = Annotated[str, model_output("policy")]
RewardModel = Annotated[str, model_output("reward")]
# a model that can be prompted for a verdict: a policy, or a judge fine-tuned for it (book ch.5)
PolicyOrJudgeModel = Annotated[str, RefType("model", ("policy", "judge"))]
SFTData = Annotated[str, dataset_output("sft")]
PreferenceData = Annotated[str, dataset_output("preference")]
PromptsData = Annotated[str, dataset_output("prompts")]
CompletionsData = Annotated[str, dataset_output("completions")]
UnpairedPreferenceData = Annotated[str, dataset_output("unpaired_preference")]
OutcomeData = Annotated[str, dataset_output("outcome")]
StepLabelData = Annotated[str, dataset_output("step_labels")]
EvalReport = Annotated[str, REPORT]


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split 'stage.output' into ('stage', 'output'); a bare name gives ('name', None)."""
    name, _, output = ref.partition(".")
    return name, (output or None)


def resolve_ref(ref: str, outputs: dict[str, dict[str, Any]]) -> Any:
    """The output a reference points at ('data.sft' -> outputs['data']['sft']); KeyError if not produced."""
    name, output = parse_ref(ref)
    produced = outputs[name]
    return produced[output] if output else next(iter(produced.values()))


def reference_fields(model: BaseModel, prefix: str = "") -> dict[str, tuple[str, RefType]]:
    """Field path -> (reference text, type) for every reference field set in ``model``, in field order.

    Paths read like the spec: ``model``, ``models[1]``, ``best_of_n.rewards[0].model``.
    """
    found: dict[str, tuple[str, RefType]] = {}
    for name, info in type(model).model_fields.items():
        found.update(_references_in(getattr(model, name), field_annotation(info), f"{prefix}{name}"))
    return found


def field_annotation(info: FieldInfo) -> Any:
    """A field's full annotation (pydantic moves top-level ``Annotated`` metadata into ``metadata``)."""
    return Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation


def annotation_marker(annotation: Any, marker_type: type[T]) -> T | None:
    """The first ``marker_type`` instance an annotation carries, through Annotated and Optional."""
    if get_origin(annotation) is Annotated:
        base, *metadata = get_args(annotation)
        found = next((m for m in metadata if isinstance(m, marker_type)), None)
        return found if found is not None else annotation_marker(base, marker_type)
    if get_origin(annotation) in (Union, types.UnionType):
        members = (annotation_marker(a, marker_type) for a in get_args(annotation))
        return next((m for m in members if m is not None), None)
    return None


def _references_in(value: Any, annotation: Any, path: str) -> dict[str, tuple[str, RefType]]:
    if value is None:
        return {}
    if isinstance(value, str):
        ref_type = annotation_marker(annotation, RefType)
        return {path: (value, ref_type)} if ref_type is not None else {}
    if isinstance(value, BaseModel):
        return reference_fields(value, f"{path}.")
    if isinstance(value, tuple | list):
        item = _item_annotation(annotation)
        found: dict[str, tuple[str, RefType]] = {}
        for i, element in enumerate(value):
            found.update(_references_in(element, item, f"{path}[{i}]"))
        return found
    return {}


def _item_annotation(annotation: Any) -> Any:
    """The element type of tuple[X, ...] / list[X] (through Annotated and Optional)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _item_annotation(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        for member in get_args(annotation):
            if get_origin(member) in (tuple, list) or get_origin(member) is Annotated:
                return _item_annotation(member)
        return None
    if origin in (tuple, list):
        return get_args(annotation)[0]
    return None
