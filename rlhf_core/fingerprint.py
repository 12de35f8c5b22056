"""Stage fingerprints: the identity of a stage's output, used for caching, resume and dispatch.

fingerprint = sha256 of its *parts* (:func:`fingerprint_parts`): the stage kind, a digest of the fully
resolved config (defaults filled in), the digest of every input ref by the field path that names it, the
content digest of every local file or directory the config names, the code digest of every reward
function the config names by reference (``rewards.py:score``), the digest of the rlhf_core source,
the versions of the libraries that shape the numbers, and the seed. A stage's ``compute`` block
(pool, processes, job variables) is left out: where a stage runs does not change its identity. The
parts are recorded with each stage run, so ``rlhf reproduce`` can say which of them changed
(:func:`describe_part_changes`).

:func:`fingerprint_stage` is the one function that the flow (before it calls a stage's task),
``rlhf plan`` and the cache use. It knows no stage kind: inputs come from the stage's typed reference
fields (:mod:`rlhf_core.spec.references`) and local paths from its ``LocalModelDir``/``LocalDataPath``
fields (:mod:`rlhf_core.spec.local_paths`).

Hashing the whole ``rlhf_core`` source on purpose: an edit to a loss or a data helper must invalidate
every cached stage (Prefect's TASK_SOURCE policy only sees the task body, not the helpers it calls).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from rlhf_core.errors import UserError
from rlhf_core.refs import StageOutput
from rlhf_core.rewards.user_functions import parse_reference, reference_digest
from rlhf_core.rollout.engines.vllm_environment import installed_vllm_version
from rlhf_core.spec.base import STAGE_CLASSES
from rlhf_core.spec.function_references import function_reference_fields
from rlhf_core.spec.local_paths import LocalContent, local_content_fields

FINGERPRINT_SCHEMA = 3  # 3: the hash of the recorded parts
KEY_LIBRARIES = ("torch", "transformers", "tokenizers", "accelerate", "peft", "datasets")


PACKAGE_ROOT = Path(__file__).resolve().parent


@cache
def code_digest(root: Path = PACKAGE_ROOT) -> str:
    """sha256 over every ``.py`` file of the rlhf_core package (path + contents, sorted)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


@cache
def library_versions() -> dict[str, str]:
    versions = {}
    for name in KEY_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def fingerprint_stage(kind: str, config: BaseModel, inputs: Mapping[str, StageOutput], seed: int) -> str:
    """Fingerprint of one stage (or ``models:`` entry, kind ``base_model``).

    ``inputs`` maps each reference field path of ``config`` (``model``, ``rewards[0].model``) to the
    ref it resolved to. Local paths named by the config are hashed by content, so edited weights or
    rows invalidate the stage.
    """
    return fingerprint_from_parts(fingerprint_parts(kind, config, inputs, seed))


def fingerprint_parts(
    kind: str, config: BaseModel, inputs: Mapping[str, StageOutput], seed: int
) -> dict[str, str]:
    """What a stage's fingerprint hashes, one named digest (or version) per part.

    Keys: ``schema``, ``kind``, ``config`` (sha256 of the resolved config), ``input:<field path>`` (the
    digest of each input ref), ``local:<field path>`` (the content digest of each local file or
    directory the config names), ``function:<field path>`` (the code of each reward function named by
    reference), ``code`` (the rlhf_core source), ``library:<name>`` (``library:vllm`` too, the engine
    environment's version, when decoding settings name engine vllm) and ``seed``.
    """
    digests = {path: ref.digest for path, ref in inputs.items()}
    for path, (location, marker) in local_content_fields(config).items():
        digests[f"{LOCAL_PREFIX}{path}"] = local_content_digest(Path(location), marker)
    for path, reference in function_reference_fields(config).items():
        digests[f"{FUNCTION_PREFIX}{path}"] = reference_digest(parse_reference(reference))
    if uses_engine(config.model_dump(mode="json"), "vllm"):  # the engine's version shapes its samples
        digests[f"{LIBRARY_PREFIX}vllm"] = installed_vllm_version()
    return parts_of(kind, config, digests, seed)


def uses_engine(node: Any, engine: str) -> bool:
    """Whether any decoding settings in a dumped config name ``engine``."""
    if isinstance(node, dict):
        return node.get("engine") == engine or any(uses_engine(v, engine) for v in node.values())
    if isinstance(node, list):
        return any(uses_engine(v, engine) for v in node)
    return False


def stage_fingerprint(
    kind: str, config: BaseModel | dict[str, Any], input_digests: dict[str, str], seed: int
) -> str:
    """The hash itself: ``input_digests`` maps input name -> content digest."""
    return fingerprint_from_parts(parts_of(kind, config, input_digests, seed))


INPUT_PREFIX = "input:"
LOCAL_PREFIX = "local:"
FUNCTION_PREFIX = "function:"
LIBRARY_PREFIX = "library:"


def parts_of(
    kind: str, config: BaseModel | dict[str, Any], input_digests: dict[str, str], seed: int
) -> dict[str, str]:
    """The parts, given the input digests (local paths already under their ``local:`` names)."""
    parts = {
        "schema": str(FINGERPRINT_SCHEMA),
        "kind": kind,
        "config": config_digest(config),
        "code": code_digest(),
        "seed": json.dumps(seed),
    }
    for name, digest in sorted(input_digests.items()):
        named = name.startswith((LOCAL_PREFIX, FUNCTION_PREFIX, LIBRARY_PREFIX))
        parts[name if named else f"{INPUT_PREFIX}{name}"] = digest
    for name, version in library_versions().items():
        parts[f"{LIBRARY_PREFIX}{name}"] = version
    return parts


def fingerprint_from_parts(parts: Mapping[str, str]) -> str:
    """sha256 over the parts (sorted by name): the fingerprint is a pure function of them."""
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode()).hexdigest()


NOT_FINGERPRINTED = ("compute",)  # where a stage runs does not change what it produces


def config_dict(config: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """The config a fingerprint hashes: every resolved field except ``compute`` (where it runs) and,
    at any depth, the fields marked ``json_schema_extra={"fingerprinted": False}`` (where a judge is
    served and how it is reached: :data:`rlhf_core.spec.endpoints.NOT_FINGERPRINTED_FIELD`).

    A plain dict (a recorded config) has no field markers; it is pruned by the marked field paths of
    the stage kind it names, so a recorded config and today's compare alike."""
    if isinstance(config, BaseModel):
        data = _drop_unfingerprinted(config, config.model_dump(mode="json"))
    else:
        model = _as_stage_spec(config)
        data = config if model is None else _drop_unfingerprinted(model, config)
    return {k: v for k, v in data.items() if k not in NOT_FINGERPRINTED}


def _as_stage_spec(config: dict[str, Any]) -> BaseModel | None:
    """A recorded stage config as its stage kind's spec (the guide to its field markers), when it
    still validates; else None."""
    stage_class = STAGE_CLASSES.get(str(config.get("kind")))
    if stage_class is None:
        return None
    try:
        return stage_class.model_validate(config)
    except (ValidationError, UserError):  # recorded by another version of the spec: compare as is
        return None


def _is_fingerprinted(field: Any) -> bool:
    extra = field.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("fingerprinted") is False)


def _drop_unfingerprinted(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    """``dumped`` (``model``'s JSON dump) without its marked fields, walking nested models, lists and
    dicts of models alongside their dumps."""
    out = {}
    for name, value in dumped.items():
        field = type(model).model_fields.get(name)
        if field is not None and not _is_fingerprinted(field):
            continue
        out[name] = _prune_value(getattr(model, name, None), value)
    return out


def _prune_value(value: Any, dumped: Any) -> Any:
    if isinstance(value, BaseModel) and isinstance(dumped, dict):
        return _drop_unfingerprinted(value, dumped)
    if isinstance(value, list | tuple) and isinstance(dumped, list):
        return [_prune_value(v, d) for v, d in zip(value, dumped, strict=True)]
    if isinstance(value, dict) and isinstance(dumped, dict):
        return {k: _prune_value(value.get(k), d) for k, d in dumped.items()}
    return dumped


def config_digest(config: BaseModel | dict[str, Any]) -> str:
    payload = json.dumps(config_dict(config), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def describe_part_changes(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Readable differences between the recorded parts of a fingerprint and today's, one line each.

    E.g. ``code changed (rlhf_core digest 1a2b3c4d -> 5e6f7a8b)``, ``local file source.file.path
    changed``, ``input model changed (digest ... -> ...)``, ``library torch 2.5.1 -> 2.6.0``.
    """
    changes = []
    for key in sorted(set(before) | set(after), key=_part_order):
        old, new = before.get(key), after.get(key)
        if old != new:
            changes.append(_describe_part(key, old, new, after.get("kind", "")))
    return changes


def _part_order(key: str) -> tuple[int, str]:
    order = ("schema", "kind", "code", "config", FUNCTION_PREFIX, LOCAL_PREFIX, INPUT_PREFIX)
    order += (LIBRARY_PREFIX, "seed")
    return next((i for i, p in enumerate(order) if key.startswith(p)), len(order)), key


def _describe_part(key: str, old: str | None, new: str | None, kind: str) -> str:
    if key == "code":
        return f"code changed (rlhf_core digest {_short(old)} -> {_short(new)})"
    if key == "config":
        return "config changed"
    if key in ("schema", "kind"):
        return f"fingerprint {key} changed ({old} -> {new})"
    if key == "seed":
        return f"seed {old} -> {new}"
    if key.startswith(LIBRARY_PREFIX):
        return f"library {key.removeprefix(LIBRARY_PREFIX)} {old} -> {new}"
    if key.startswith(FUNCTION_PREFIX):
        path = key.removeprefix(FUNCTION_PREFIX)
        what = f"{'environment code' if path.startswith('environment.') else 'reward function'} {path}"
    elif key.startswith(LOCAL_PREFIX):
        local = "local model directory" if kind == "base_model" else "local file"
        what = f"{local} {key.removeprefix(LOCAL_PREFIX)}"
    else:
        what = f"input {key.removeprefix(INPUT_PREFIX)}"
    if old is None:
        return f"{what} added"
    if new is None:
        return f"{what} removed"
    return f"{what} changed (digest {_short(old)} -> {_short(new)})"


def _short(digest: str | None) -> str:
    return (digest or "none")[:12]


def config_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """``config field train.lr: 0.003 -> 0.001`` for every leaf of two config dicts that differs."""
    old, new = _leaves(before), _leaves(after)
    lines = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            lines.append(f"config field {key} added ({new[key]})")
        elif key not in new:
            lines.append(f"config field {key} removed (was {old[key]})")
        elif old[key] != new[key]:
            lines.append(f"config field {key}: {old[key]} -> {new[key]}")
    return lines


def _leaves(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value, sort_keys=True, default=str)
    return out


def local_content_digest(location: Path, marker: LocalContent) -> str:
    """Content digest of a local model directory or data file/directory."""
    from rlhf_core.data.loading import directory_digest, file_digest
    from rlhf_core.modeling.digests import model_digest

    if marker.content == "model":
        return model_digest(location)
    return directory_digest(location) if location.is_dir() else file_digest(location)
