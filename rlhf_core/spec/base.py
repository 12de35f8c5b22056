"""What every spec class shares: strict frozen models, names, and the base class of stage kinds.

A stage kind is one class deriving from ``StageSpec``: its ``kind`` literal, its fields (with typed
reference fields, see :mod:`rlhf_core.spec.references`) and the outputs it produces. Defining the
class registers the kind; the pipeline's stage union, reference checks, inputs and fingerprints are
derived from it by generic code.
"""

from __future__ import annotations

from typing import Any, ClassVar, get_args

from pydantic import BaseModel, ConfigDict, Field

from rlhf_core.errors import UserError
from rlhf_core.spec.compute import ComputeSpec
from rlhf_core.spec.references import RefType, reference_fields

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
NAME_RULE = "1-64 letters, digits, '_' or '-', starting with a letter or digit"


class SpecError(UserError):
    """A spec problem; ``problems`` holds one line per problem, each naming stage and field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid pipeline spec:\n" + "\n".join(f"  - {p}" for p in problems))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


STAGE_CLASSES: dict[str, type[StageSpec]] = {}
"""Stage kind -> its spec class, filled as the classes are defined."""


class StageSpec(Strict):
    """Base of every stage kind. Subclasses declare ``kind: Literal["<name>"]`` and ``outputs``."""

    outputs: ClassVar[dict[str, RefType]] = {}
    """Output name -> what it is (a policy model, an sft dataset, ...)."""

    seed: int | None = Field(default=None, description="Seed for this stage; defaults to the pipeline seed.")
    compute: ComputeSpec | None = Field(
        default=None,
        description="Where the stage runs (a Prefect work pool, job variables, training processes); "
        "not part of its fingerprint. Unset: in the pipeline's process, or as a --profile says.",
    )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("kind")
        if field is None:
            return  # an intermediate base class
        (kind,) = get_args(field.annotation)
        if kind in STAGE_CLASSES and STAGE_CLASSES[kind].__qualname__ != cls.__qualname__:
            raise TypeError(f"stage kind {kind!r} is declared twice: {STAGE_CLASSES[kind]} and {cls}")
        STAGE_CLASSES[kind] = cls

    def input_refs(self) -> dict[str, tuple[str, RefType]]:
        """Field path -> (reference text, what it must point at), for every reference this stage holds."""
        return reference_fields(self)

    def output_types(self) -> dict[str, RefType]:
        """Output name -> type. Override when the outputs depend on the stage's fields."""
        return dict(self.outputs)

    def resolved(self) -> StageSpec:
        """This stage with every default that depends on its other fields filled in (the values that run,
        are logged and fingerprinted; see ``rlhf_core.spec``). Kinds with such defaults override it."""
        return self

    trains_in_processes: ClassVar[bool] = False
    """Whether the kind's training can run in several processes (``compute.processes`` > 1)."""

    def shared_tokenizer_refs(self) -> dict[str, tuple[str, str]]:
        """Field path -> (student, teacher) references of models that must share a tokenizer (a teacher
        scoring a student's token ids: distillation); checked when the spec is read where the base models
        tell (:func:`rlhf_core.spec.pipeline.tokenizer_problems`), and on the tokenizers before training."""
        return {}

    def processes_problem(self) -> str | None:
        """Why this stage cannot train in ``compute.processes`` processes (None: it can)."""
        if self.compute is None or self.compute.processes == 1 or self.trains_in_processes:
            return None
        return (
            f"{self.kind} stages run in one process (several training processes: "
            f"{', '.join(k for k, c in STAGE_CLASSES.items() if c.trains_in_processes)}); set it to 1"
        )


STAGE_TEMPLATES: dict[str, type[StageTemplate]] = {}
"""Template kind -> its class: kinds that expand into several stages when the spec is read."""


class StageTemplate(Strict):
    """Base of a stage template: one entry of ``stages:`` that stands for several ordinary stages.

    Subclasses declare ``kind: Literal["<name>"]`` and ``expand(name, pipeline_seed)``, which returns
    the raw stage entries it stands for; every other check (references, caching, lineage, resume)
    then applies to those stages as to any other.
    """

    seed: int | None = Field(
        default=None, description="Seed of the expanded stages; default: the pipeline's."
    )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        (kind,) = get_args(cls.model_fields["kind"].annotation)
        STAGE_TEMPLATES[kind] = cls

    def expand(self, name: str, pipeline_seed: int) -> dict[str, dict[str, Any]]:
        raise NotImplementedError


def check_split_fractions(splits: dict[str, float]) -> None:
    total = sum(splits.values())
    if abs(total - 1.0) > 1e-6 or any(v <= 0 for v in splits.values()):
        raise ValueError(f"splits must be positive and sum to 1, got {splits} (sum {total:g})")
