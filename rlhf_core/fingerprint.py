"""Stage fingerprints: the identity of a stage's output, used for caching, resume and dispatch.

fingerprint = sha256(stage kind, fully resolved config (defaults filled in), the digest of every input
ref by the field path that names it, the content digest of every local file or directory the config
names, digest of the rlhf_core source, versions of the libraries that shape the numbers, seed).

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

from pydantic import BaseModel

from rlhf_core.refs import StageOutput
from rlhf_core.spec.local_paths import LocalContent, local_content_fields

FINGERPRINT_SCHEMA = 2
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
    digests = {path: ref.digest for path, ref in inputs.items()}
    for path, (location, marker) in local_content_fields(config).items():
        digests[f"local:{path}"] = local_content_digest(Path(location), marker)
    return stage_fingerprint(kind, config, digests, seed)


def stage_fingerprint(
    kind: str, config: BaseModel | dict[str, Any], input_digests: dict[str, str], seed: int
) -> str:
    """The hash itself: ``input_digests`` maps input name -> content digest."""
    payload = {
        "schema": FINGERPRINT_SCHEMA,
        "kind": kind,
        "config": config.model_dump(mode="json") if isinstance(config, BaseModel) else config,
        "inputs": dict(sorted(input_digests.items())),
        "code": code_digest(),
        "libraries": library_versions(),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def local_content_digest(location: Path, marker: LocalContent) -> str:
    """Content digest of a local model directory or data file/directory."""
    from rlhf_core.data.loading import directory_digest, file_digest
    from rlhf_core.modeling.digests import model_digest

    if marker.content == "model":
        return model_digest(location)
    return directory_digest(location) if location.is_dir() else file_digest(location)
