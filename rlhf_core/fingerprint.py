"""Stage fingerprints: the identity of a stage's output, used for caching and resume.

fingerprint = sha256(stage kind, fully resolved config (defaults filled in), digests of the input refs,
digest of the rlhf_core source, versions of the libraries that shape the numbers, seed).

Hashing the whole ``rlhf_core`` source on purpose: an edit to a loss or a data helper must invalidate
every cached stage (Prefect's TASK_SOURCE policy only sees the task body, not the helpers it calls).
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

FINGERPRINT_SCHEMA = 1
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


def stage_fingerprint(
    kind: str, config: BaseModel | dict[str, Any], input_digests: dict[str, str], seed: int
) -> str:
    """Fingerprint of one stage. ``input_digests`` maps input field -> content digest of the ref."""
    payload = {
        "schema": FINGERPRINT_SCHEMA,
        "kind": kind,
        "config": config.model_dump(mode="json") if isinstance(config, BaseModel) else config,
        "inputs": input_digests,
        "code": code_digest(),
        "libraries": library_versions(),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def input_digests(inputs: dict[str, Any]) -> dict[str, str]:
    """Input field -> digest of the ref bound to it (refs carry content digests)."""
    return {name: ref.digest for name, ref in sorted(inputs.items())}


def base_model_fingerprint(name: str, source: Any, seed: int) -> str:
    """Fingerprint of a ``models:`` entry. A local path is hashed by content, so edited weights invalidate."""
    from rlhf_core.modeling.digests import model_digest

    inputs = {"path": model_digest(Path(source.path))} if source.path else {}
    return stage_fingerprint("base_model", source, inputs, seed)


def dataset_fingerprint(stage: Any, seed: int) -> str:
    """Fingerprint of a ``dataset`` stage; a local source file is hashed by content."""
    from rlhf_core.data.loading import directory_digest, file_digest

    inputs = {}
    if stage.source.file is not None:
        path = Path(stage.source.file.path)
        inputs["file"] = directory_digest(path) if path.is_dir() else file_digest(path)
    return stage_fingerprint("dataset", stage, inputs, seed)


def sft_fingerprint(stage: Any, seed: int, model: Any, data: Any) -> str:
    return stage_fingerprint("sft", stage, input_digests({"model": model, "data": data}), seed)


def evaluate_fingerprint(
    stage: Any,
    seed: int,
    models: dict[str, Any],
    data: Any | None,
    prompts: Any | None,
    reward_models: dict[str, Any] | None = None,
) -> str:
    inputs = {f"model:{name}": ref for name, ref in models.items()}
    inputs.update({k: v for k, v in {"data": data, "prompts": prompts}.items() if v is not None})
    inputs.update({f"reward:{k}": v for k, v in (reward_models or {}).items()})
    return stage_fingerprint("evaluate", stage, input_digests(inputs), seed)


def reward_model_fingerprint(stage: Any, seed: int, model: Any, data: Any) -> str:
    return stage_fingerprint("reward_model", stage, input_digests({"model": model, "data": data}), seed)


def sample_fingerprint(
    stage: Any, seed: int, policy: Any, prompts: Any, reward_models: dict[str, Any]
) -> str:
    inputs = {"policy": policy, "prompts": prompts, **{f"reward:{k}": v for k, v in reward_models.items()}}
    return stage_fingerprint("sample", stage, input_digests(inputs), seed)


def rejection_sampling_fingerprint(stage: Any, seed: int, completions: Any) -> str:
    return stage_fingerprint("rejection_sampling", stage, input_digests({"completions": completions}), seed)


def label_preferences_fingerprint(
    stage: Any, seed: int, completions: Any, judge_models: dict[str, Any]
) -> str:
    inputs = {"completions": completions, **{f"judge:{k}": v for k, v in judge_models.items()}}
    return stage_fingerprint("label_preferences", stage, input_digests(inputs), seed)
