"""Reading a spec: YAML (duplicate keys rejected), ``--set`` overrides, validation, readable errors; and
reading a compute-profile file (``profiles.yaml``, :mod:`rlhf_core.spec.compute`) to choose a profile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rlhf_core.spec.base import NAME_RULE, STAGE_TEMPLATES, SpecError
from rlhf_core.spec.compute import BUILTIN_PROFILES, PROFILE_FILE, ComputeProfile, ComputeProfiles
from rlhf_core.spec.local_paths import missing_local_paths
from rlhf_core.spec.pipeline import STAGE_KINDS, PipelineSpec, position_limit_problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} on line {line} (first given on line {seen[key]})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; duplicate keys are an error naming the key and its lines."""
    return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_file(path: Path, what: str) -> Any:
    """``read_yaml``, with a missing file or bad YAML as a SpecError (``what``: 'spec', 'profile')."""
    try:
        return read_yaml(path)
    except FileNotFoundError:
        raise SpecError([f"{what} file not found: {path}"]) from None
    except yaml.YAMLError as exc:
        raise SpecError([f"{path}: not valid YAML: {exc}"]) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> PipelineSpec:
    """Read a YAML spec, apply ``--set a.b=c`` overrides, validate. Raises SpecError."""
    path = Path(path)
    raw = read_yaml_file(path, "spec")
    if not isinstance(raw, dict):
        raise SpecError([f"{path}: expected a mapping at the top level, got {type(raw).__name__}"])
    for override in overrides or []:
        apply_override(raw, override)
    return parse_spec(raw, base_dir=path.parent)


def parse_spec(raw: dict[str, Any], base_dir: str | Path = ".") -> PipelineSpec:
    """Validate a spec given as a dict; relative local paths are taken from ``base_dir``.

    Stage templates (e.g. ``iterative_dpo``) are expanded into their stages first. Then: fields,
    types, names, references and cycles, that every local path the spec names exists, and
    ``max_length`` fields against the position limits of tiny and local base models.
    """
    raw = expand_templates(raw)
    try:
        spec = PipelineSpec.model_validate(raw, context={"base_dir": str(Path(base_dir).resolve())})
    except ValidationError as exc:
        raise SpecError(_format_validation_error(exc)) from None
    problems = [
        f"model '{name}', field {field}: {problem}"
        for name, source in spec.models.items()
        for field, problem in missing_local_paths(source).items()
    ] + [
        f"stage '{name}', field {field}: {problem}"
        for name, stage in spec.stages.items()
        for field, problem in missing_local_paths(stage).items()
    ]
    problems = problems or position_limit_problems(spec, _known_position_limits(spec))
    if problems:
        raise SpecError(problems)
    return spec


def expand_templates(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with every stage-template entry replaced, in place, by the stages it stands for."""
    stages = raw.get("stages")
    if not isinstance(stages, dict):
        return raw
    seed = raw.get("seed", 0) if isinstance(raw.get("seed", 0), int) else 0
    expanded: dict[str, Any] = {}
    problems: list[str] = []
    for name, entry in stages.items():
        template = STAGE_TEMPLATES.get(entry.get("kind")) if isinstance(entry, dict) else None
        if template is None:
            expanded[name] = entry
            continue
        try:
            parts = template.model_validate(entry).expand(str(name), seed)
        except ValidationError as exc:
            problems += _format_validation_error(exc, prefix=("stages", str(name)))
            continue
        for part, part_entry in parts.items():
            if (part != name and part in stages) or part in expanded:
                problems.append(f"stage '{name}': expands to a stage '{part}', a name already in use")
            expanded[part] = part_entry
    if problems:
        raise SpecError(problems)
    return {**raw, "stages": expanded}


def resolve_spec(spec: PipelineSpec) -> PipelineSpec:
    """The effective spec that runs: defaults filled in, model-dependent ones following the models whose
    config is at hand (:meth:`PipelineSpec.resolved`)."""
    return spec.resolved(_known_position_limits(spec))


def _known_position_limits(spec: PipelineSpec) -> dict[str, int]:
    """Position limits of the base models whose config is at hand: tiny ones and local directories."""
    limits = {}
    for name, source in spec.models.items():
        if source.tiny is not None:
            limits[name] = source.tiny.max_position_embeddings
        elif source.path is not None:
            try:
                config = json.loads((Path(source.path) / "config.json").read_text())
            except OSError:
                continue  # not on this machine (a work-pool worker): the base-model stage says so
            except ValueError as exc:
                raise SpecError(
                    [f"model '{name}', field path: {source.path}/config.json is not JSON: {exc}"]
                ) from None
            text_config = config.get("text_config") or {}
            limit = next(  # GPT-2-style configs call it n_positions; multimodal ones nest a text config
                (
                    c[k]
                    for c in (config, text_config)
                    for k in ("max_position_embeddings", "n_positions")
                    if k in c
                ),
                None,
            )
            if isinstance(limit, int):
                limits[name] = limit
    return limits


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (numbers, lists...)."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise SpecError([f"--set '{override}': expected KEY.PATH=VALUE, e.g. stages.sft.train.lr=1e-4"])
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise SpecError([f"--set '{override}': '{'.'.join(parts[:i])}' is not a mapping"])
        node = node.setdefault(part, {})
    if not isinstance(node, dict):
        raise SpecError([f"--set '{override}': '{'.'.join(parts[:-1])}' is not a mapping"])
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise SpecError([f"--set '{override}': value is not valid YAML: {exc}"]) from None


def validation_problems(exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[str]:
    """One line per error of ``exc``: its field path and what was expected."""
    return _format_validation_error(exc, prefix)


def _format_validation_error(exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = [*prefix, *(str(part) for part in err["loc"])]
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "union_tag_not_found":
            message = f"field kind is missing; give one of: {', '.join(sorted(STAGE_KINDS))}"
        elif err["type"] == "string_pattern_mismatch" and loc[-1:] == ["name"]:
            message = f"{err['input']!r} is not a valid name; use {NAME_RULE}"
        loc = ["name" if part == "[key]" else part for part in loc]  # a mapping key: the stage's name
        if loc[:1] == ["stages"] and len(loc) >= 2:
            stage, rest = loc[1], loc[2:]
            if rest and rest[0] in STAGE_KINDS:
                rest = rest[1:]  # drop the discriminated-union tag pydantic adds
            where = f"stage '{stage}'" + (f", field {'.'.join(rest)}" if rest else "")
        elif loc[:1] == ["models"] and len(loc) >= 2:
            where = f"model '{loc[1]}'" + (f", field {'.'.join(loc[2:])}" if loc[2:] else "")
        elif loc:
            where = f"field {'.'.join(loc)}"
        else:
            where = "pipeline"
        for line in message.splitlines():
            problems.append(line if line.startswith(("stage ", "model ")) else f"{where}: {line}")
    return problems


def pipeline_json_schema() -> dict[str, Any]:
    """JSON Schema of a spec file: the pipeline, every stage kind, and the stage templates a stage
    entry may also be (they expand before validation, so the pipeline model alone does not list them)."""
    schema = PipelineSpec.model_json_schema()
    definitions = schema.setdefault("$defs", {})
    templates = []
    for template in STAGE_TEMPLATES.values():
        sub = template.model_json_schema(ref_template="#/$defs/{model}")
        definitions.update(sub.pop("$defs", {}))
        definitions[template.__name__] = sub
        templates.append({"$ref": f"#/$defs/{template.__name__}"})
    stages = schema["properties"]["stages"]
    stages["additionalProperties"] = {"anyOf": [stages["additionalProperties"], *templates]}
    return schema


def apply_spec_overrides(spec: PipelineSpec, overrides: dict[str, Any] | None) -> PipelineSpec:
    """``spec`` with each ``path -> value`` set (paths as in the deployment's form); SpecError naming
    the path when it does not exist or the value does not fit.

    The values are set on what the spec wrote (``exclude_unset``), so a default that follows another
    field (a loss's beta, a model's position limit) follows it after the override too."""
    if not overrides:
        return spec
    full = spec.model_dump(mode="json")
    data = spec.model_dump(mode="json", exclude_unset=True)
    problems = []
    for path, value in overrides.items():
        parts = str(path).split(".")
        parent = lookup_path(full, parts[:-1])
        if not isinstance(parent, dict) or parts[-1] not in parent:
            problems.append(f"override {path}: no such field in pipeline '{spec.name}'")
            continue
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    if problems:
        raise SpecError(problems)
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError([f"override: {p}" for p in validation_problems(exc)]) from None


MISSING = object()


def lookup_path(data: Any, path: list[str]) -> Any:
    """The value at ``path`` (keys) in nested dicts, or :data:`MISSING`."""
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return MISSING
        data = data[part]
    return data


def load_profiles(path: str | Path) -> dict[str, ComputeProfile]:
    """The profiles of a profile file (plus the built-in ``local``); SpecError naming the field."""
    path = Path(path)
    raw = read_yaml_file(path, "profile")
    try:
        parsed = ComputeProfiles.model_validate(raw or {})
    except ValidationError as exc:
        raise SpecError([f"{path}: {p}" for p in validation_problems(exc)]) from None
    return {**BUILTIN_PROFILES, **parsed.profiles}


def find_profile_file(spec_path: str | Path, explicit: str | Path | None = None) -> Path | None:
    """``explicit``, else ``profiles.yaml`` next to the spec, else in the working directory."""
    if explicit is not None:
        return Path(explicit)
    for candidate in (Path(spec_path).parent / PROFILE_FILE, Path.cwd() / PROFILE_FILE):
        if candidate.is_file():
            return candidate
    return None


def resolve_profile(name: str, profile_file: Path | None) -> ComputeProfile:
    """The profile called ``name``: from the file, or built in; SpecError listing the known ones."""
    profiles = load_profiles(profile_file) if profile_file is not None else dict(BUILTIN_PROFILES)
    if name not in profiles:
        where = f" in {profile_file}" if profile_file is not None else " (no profiles.yaml found)"
        raise SpecError([f"--profile {name}: no such profile{where}; known: {', '.join(sorted(profiles))}"])
    return profiles[name]
