"""Spec fields that name a reward function or verifier: a built-in by name, or a user's by reference.

Such a field is typed ``RewardFunctionName``. Generic code uses its marker to:

- make a file reference absolute against the spec file's directory (validation context ``base_dir``),
  so ``rewards.py:score`` means the file next to the spec wherever the run starts;
- hash the referenced code into the stage fingerprint (:mod:`rlhf_core.fingerprint`), so an edited
  reward re-runs exactly the stages that use it (:func:`function_reference_fields` finds them, in
  nested models and in tuples of them such as ``rewards``).

Loading and checking the function itself (it exists, takes the right parameters and the given
options) is done by the model that holds the field (:class:`rlhf_core.spec.RewardSourceSpec`), which
also knows the options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ValidationInfo

from rlhf_core.errors import UserError
from rlhf_core.rewards.user_functions import is_reference, parse_reference
from rlhf_core.spec.references import annotation_marker, field_annotation


@dataclass(frozen=True)
class FunctionCode:
    """Marker: the field names a reward function whose code is an input of the stage."""


def _absolute_reference(text: str, info: ValidationInfo) -> str:
    if not is_reference(text):
        return text
    try:
        return parse_reference(text, Path((info.context or {}).get("base_dir", "."))).text
    except UserError as exc:
        raise ValueError(str(exc)) from None


RewardFunctionName = Annotated[str, FunctionCode(), AfterValidator(_absolute_reference)]


def function_reference_fields(model: BaseModel, prefix: str = "") -> dict[str, str]:
    """Field path -> reference (``file.py:fn`` or ``module:fn``; built-in names left out) for every
    reward-function field set in ``model``, through nested models and tuples of them."""
    found: dict[str, str] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if annotation_marker(field_annotation(info), FunctionCode) is not None:
            if isinstance(value, str) and is_reference(value):
                found[f"{prefix}{name}"] = value
        elif isinstance(value, BaseModel):
            found.update(function_reference_fields(value, f"{prefix}{name}."))
        elif isinstance(value, tuple | list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    found.update(function_reference_fields(item, f"{prefix}{name}[{i}]."))
    return found
