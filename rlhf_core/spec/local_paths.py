"""Spec fields that name local files or directories whose content a stage depends on.

Such a field is typed ``LocalModelDir`` or ``LocalDataPath``. Generic code uses the marker to:

- make a relative path absolute against the spec file's directory (validation context ``base_dir``);
- check before anything runs that the path exists (:func:`missing_local_paths`);
- hash the content into the fingerprint (:mod:`rlhf_core.fingerprint`), so edited weights or rows
  invalidate the stages that read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ValidationInfo

from rlhf_core.spec.references import annotation_marker, field_annotation


@dataclass(frozen=True)
class LocalContent:
    """Marker: the field is a local path whose content is an input of the stage."""

    content: Literal["model", "data"]


def _absolute(path: str, info: ValidationInfo) -> str:
    base = Path((info.context or {}).get("base_dir", "."))
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


LocalModelDir = Annotated[str, LocalContent("model"), AfterValidator(_absolute)]
LocalDataPath = Annotated[str, LocalContent("data"), AfterValidator(_absolute)]


def local_content_fields(model: BaseModel, prefix: str = "") -> dict[str, tuple[str, LocalContent]]:
    """Field path -> (absolute path, marker) for every local-content field set in ``model`` (nested too)."""
    found: dict[str, tuple[str, LocalContent]] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        marker = annotation_marker(field_annotation(info), LocalContent)
        if marker is not None and isinstance(value, str):
            found[f"{prefix}{name}"] = (value, marker)
        elif isinstance(value, BaseModel):
            found.update(local_content_fields(value, f"{prefix}{name}."))
    return found


def missing_local_paths(model: BaseModel) -> dict[str, str]:
    """Field path -> problem, for local paths that do not exist (or a model dir without config.json)."""
    problems = {}
    for path, (value, marker) in local_content_fields(model).items():
        location = Path(value)
        if not location.exists():
            what = "a directory saved with save_pretrained" if marker.content == "model" else "a data file"
            problems[path] = f"{value} does not exist (expected {what})"
        elif marker.content == "model" and not (location / "config.json").is_file():
            problems[path] = f"{value} has no config.json: not a save_pretrained model directory"
    return problems
