"""Champion aliases in the Model Registry: gated promotion, promotion and rollback by hand, history.

- ``promote``: ``alias`` (``champion``) moves to a version; the version that held it takes
  ``previous_alias`` (``previous-champion``), so it stays addressable and a rollback has a target.
- ``record_rejection``: a failed gate moves no alias; the version is tagged with the reason.
- ``rollback``: ``alias`` goes back to the ``previous_alias`` version; the demoted version is tagged.

Every move is appended to the registered model's ``rlhf.alias_history`` tag (JSON, newest last,
the last ``HISTORY_LENGTH`` moves), with who made it: a promote stage, or ``manual``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from mlflow.exceptions import MlflowException

from registry.model_metrics import version_metrics
from registry.tracking import client
from rlhf_core.errors import UserError

CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"
HISTORY_TAG = "rlhf.alias_history"
HISTORY_LENGTH = 50
GATE_DECISION_TAG = "rlhf.gate.decision"
GATE_REASON_TAG = "rlhf.gate.reason"
GATE_FIGURES_TAG = "rlhf.gate.figures"
GATE_STAGE_TAG = "rlhf.gate.stage"
PROMOTED_TAG = "rlhf.promoted"
PROMOTED_AT_TAG = "rlhf.promoted_at"
ROLLED_BACK_TAG = "rlhf.rolled_back"
ROLLED_BACK_FROM_TAG = "rlhf.rolled_back_from"


class RegistryError(UserError):
    """A registered model, version or alias that does not exist, or a move that cannot be made."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def alias_version(name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None when the alias (or the model) does not exist."""
    try:
        return str(client().get_registered_model(name).aliases[alias])
    except (MlflowException, KeyError):
        return None


def check_version(name: str, version: str) -> None:
    try:
        client().get_model_version(name, version)
    except MlflowException:
        known = ", ".join(str(v.version) for v in _versions(name)) or "none"
        raise RegistryError(f"model '{name}' has no version {version} (versions: {known})") from None


def promote(
    name: str, version: str, *, alias: str, previous_alias: str, by: str, tags: dict[str, str] | None = None
) -> str | None:
    """Point ``alias`` at ``version``; the version that held it takes ``previous_alias``.

    Returns the previous holder (None if there was none, or it was this version already).
    """
    check_version(name, version)
    c = client()
    previous = alias_version(name, alias)
    if previous == version:
        previous = None
    if previous is not None:
        c.set_registered_model_alias(name, previous_alias, previous)
    c.set_registered_model_alias(name, alias, version)
    for key, value in {PROMOTED_TAG: by, PROMOTED_AT_TAG: _now(), **(tags or {})}.items():
        c.set_model_version_tag(name, version, key, value)
    _append_history(
        name, {"action": "promote", "alias": alias, "version": version, "from": previous, "by": by}
    )
    return previous


def record_rejection(name: str, version: str, tags: dict[str, str]) -> None:
    """Tag a version a gate rejected; no alias moves."""
    for key, value in tags.items():
        client().set_model_version_tag(name, version, key, value)


def rollback(
    name: str, *, alias: str = CHAMPION, previous_alias: str = PREVIOUS_CHAMPION, by: str = "manual"
) -> tuple[str, str]:
    """Point ``alias`` back at the ``previous_alias`` version; returns (demoted, restored) versions.

    The previous alias is removed afterwards (the history tag keeps the whole sequence); the demoted
    version is tagged ``rlhf.rolled_back`` and the restored one ``rlhf.rolled_back_from``.
    """
    current, restored = alias_version(name, alias), alias_version(name, previous_alias)
    if current is None:
        raise RegistryError(f"model '{name}' has no '{alias}' alias to roll back")
    if restored is None:
        raise RegistryError(
            f"model '{name}' has no '{previous_alias}' alias: nothing to roll back to "
            f"(promote a version by hand with `rlhf models promote {name} <version>`)"
        )
    c = client()
    c.set_registered_model_alias(name, alias, restored)
    c.delete_registered_model_alias(name, previous_alias)
    c.set_model_version_tag(name, current, ROLLED_BACK_TAG, f"{_now()} by {by}: {alias} -> v{restored}")
    c.set_model_version_tag(name, restored, ROLLED_BACK_FROM_TAG, current)
    _append_history(
        name, {"action": "rollback", "alias": alias, "version": restored, "from": current, "by": by}
    )
    return current, restored


def alias_history(name: str) -> list[dict]:
    tags = client().get_registered_model(name).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def _append_history(name: str, event: dict) -> None:
    history = [*alias_history(name), {"time": _now(), **event}][-HISTORY_LENGTH:]
    payload = json.dumps(history, separators=(",", ":"))
    while len(payload) > 5000 and len(history) > 1:  # MLflow's limit on a tag value
        history = history[1:]
        payload = json.dumps(history, separators=(",", ":"))
    client().set_registered_model_tag(name, HISTORY_TAG, payload)


@dataclass(frozen=True)
class VersionSummary:
    """One registered version as ``rlhf models list`` shows it."""

    name: str
    version: str
    aliases: tuple[str, ...]
    stage: str
    created: str
    gate: str
    metrics: dict[str, float]


def version_summaries(name: str | None = None) -> list[VersionSummary]:
    """Every version of every registered model (or of ``name``), newest version first per model."""
    c = client()
    if name is not None:
        try:
            models = [c.get_registered_model(name)]
        except MlflowException:
            raise RegistryError(f"no registered model named '{name}'") from None
    else:
        models = sorted(c.search_registered_models(max_results=1000), key=lambda m: m.name)
    rows = []
    for model in models:
        aliases_of: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases_of.setdefault(str(version), []).append(alias)
        for v in sorted(_versions(model.name), key=lambda v: -int(v.version)):
            created = datetime.fromtimestamp(v.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M")
            rows.append(
                VersionSummary(
                    name=model.name,
                    version=str(v.version),
                    aliases=tuple(sorted(aliases_of.get(str(v.version), []))),
                    stage=v.tags.get("rlhf.stage", ""),
                    created=created,
                    gate=v.tags.get(GATE_DECISION_TAG, ""),
                    metrics=version_metrics(model.name, str(v.version)),
                )
            )
    return rows


def _versions(name: str) -> list:
    return list(client().search_model_versions(f"name = '{name}'", max_results=1000))
