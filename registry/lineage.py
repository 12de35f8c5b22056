"""Lineage of a registered model version, read back from what the Model Registry and the runs hold.

A version is named by ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``<name>:<version>`` or
a bare ``<name>``: its ``champion`` if it has one, else its latest version (as ``rlhf models list``
shows them).
Its lineage tags (``rlhf.upstream_models``, ``rlhf.reward_models``, ...; see
``tasks.model_outputs.register_stage_model``) point at the versions it was built from, so the chain
policy <- SFT <- base model (reward model <- its data digests) is walked version by version.

``producing_pipeline`` goes the other way round for ``rlhf reproduce``: version -> its stage run ->
the pipeline run (tag ``rlhf.pipeline_run_id``) -> that run's ``resolved_spec.yaml`` and the record of
every stage it ran or took from cache (fingerprint, fingerprint parts, output refs).

Nothing here assumes that the runs of one lineage share an experiment: a stage's result may have been
reused from another pipeline's run (``registry.stage_cache``), so runs are read by id, and searches by
tag go over every experiment of the tracking store.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from pydantic import TypeAdapter

from registry.promotion import CHAMPION
from registry.stage_cache import (
    COMPLETE_TAG,
    FINGERPRINT_TAG,
    OUTPUT_TAG,
    PIPELINE_RUN_TAG,
    run_origin,
    search_all_experiments,
)
from registry.tracking import client
from rlhf_core.errors import UserError
from rlhf_core.refs import StageOutput

if TYPE_CHECKING:
    from rlhf_core.spec import PipelineSpec

UPSTREAM_TAG = "rlhf.upstream_models"
UPSTREAM_URI_TAG = "rlhf.upstream_model_uri"
RESOLVED_SPEC = "resolved_spec.yaml"
FINGERPRINT_PARTS = "fingerprint_parts.json"
# Version tags naming other models, with what the model used each one for (walked in this order).
RELATION_TAGS = {
    UPSTREAM_TAG: "trained from",
    "rlhf.reference_model": "reference",
    "rlhf.reward_models": "reward model",
    "rlhf.value_model_init": "value model init",
    "rlhf.teacher_model": "teacher",
}
REF_FORMS = (
    "models:/<name>@<alias>, models:/<name>/<version>, <name>:<version> or <name> (its champion, else its "
    "latest version)"
)
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_NAME_VERSION = re.compile(r"^(?P<name>[^/:@]+):(?P<version>\d+)$")
_BARE_NAME = re.compile(r"^(?P<name>[^/:@\s'\"]+)$")
_STAGE_RUN = re.compile(r"\brun=(?P<run>[0-9a-f]{32})\b")
_OUTPUTS = TypeAdapter(dict[str, StageOutput])


@dataclass(frozen=True)
class VersionRef:
    """One registered model version."""

    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of a model reference; UserError naming the accepted forms otherwise."""
    text = ref.strip()
    for pattern in (_ALIAS_URI, _VERSION_URI, _NAME_VERSION, _BARE_NAME):
        if match := pattern.match(text):
            groups = match.groupdict()
            return groups["name"], groups.get("version"), groups.get("alias")
    raise UserError(f"model reference {ref!r}: expected {REF_FORMS}")


def resolve_version(ref: str) -> VersionRef:
    """The registered version a reference names (an alias resolved now); UserError if there is none."""
    name, version, alias = parse_model_ref(ref)
    c = client()
    try:
        if alias is None and version is None:
            return _champion_or_latest(name)
        if alias is not None:
            return VersionRef(name, str(c.get_model_version_by_alias(name, alias).version))
        c.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        known = ", ".join(sorted(m.name for m in c.search_registered_models(max_results=50))) or "none"
        raise UserError(
            f"model reference {ref!r}: no such registered version in this home's registry "
            f"(registered models: {known})"
        ) from None
    return VersionRef(name, str(version))


def check_registered_models(spec: PipelineSpec) -> None:
    """UserError naming each ``models:`` entry whose ``registered`` version this home's registry lacks."""
    references = {name: s.registered for name, s in spec.models.items() if s.registered is not None}
    problems = missing_registered_models(references) if references else []
    if problems:
        raise UserError("\n".join(problems))


def missing_registered_models(references: dict[str, str]) -> list[str]:
    """A problem line for each ``models:`` entry -> ``registered`` reference that this home's registry
    does not have, listing what the registry holds under that name (checked before any stage runs)."""
    c = client()
    problems = []
    for entry, ref in references.items():
        try:
            resolve_version(ref)
            continue
        except UserError:
            pass
        name = parse_model_ref(ref)[0]
        problems.append(
            f"model '{entry}', field registered: {ref!r} is not in this home's registry ({_held(c, name)})"
        )
    return problems


def _held(c: mlflow.MlflowClient, name: str) -> str:
    """What the registry has under ``name``: its versions and aliases, or the registered names."""
    try:
        aliases = c.get_registered_model(name).aliases or {}
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = ", ".join(sorted(m.name for m in c.search_registered_models(max_results=50))) or "none"
        return f"no registered model named '{name}'; registered models: {known}"
    versions = sorted(int(v.version) for v in c.search_model_versions(f"name='{name}'"))
    shown = ", ".join(str(v) for v in versions) or "none"
    named = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
    return f"'{name}' has versions {shown}; aliases {named}"


def _champion_or_latest(name: str) -> VersionRef:
    """A bare name: the version holding ``champion``, else the newest version (MlflowException if none)."""
    c = client()
    try:
        return VersionRef(name, str(c.get_model_version_by_alias(name, CHAMPION).version))
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    versions = [int(v.version) for v in c.search_model_versions(f"name = '{name}'")]
    if not versions:
        raise MlflowException(f"registered model {name!r} has no versions", RESOURCE_DOES_NOT_EXIST)
    return VersionRef(name, str(max(versions)))


def related_models(text: str) -> list[VersionRef | str]:
    """The models a lineage tag value names: ``name:version`` entries, else local paths or hub names."""
    found: list[VersionRef | str] = []
    for item in (part.strip() for part in text.split(",")):
        if match := _NAME_VERSION.match(item):
            found.append(VersionRef(match["name"], match["version"]))
        elif item:
            found.append(item)
    return found


def dataset_digests(text: str) -> dict[str, str]:
    """``{"data.sft": "<sha256>"}`` from an ``rlhf.dataset_digests`` tag (``stage.kind=digest,...``)."""
    pairs = (item.partition("=") for item in text.split(",") if item.strip())
    return {key.strip(): digest.strip() for key, _, digest in pairs}


@dataclass
class LineageNode:
    """One model in a lineage tree: a registered version, or an external model (local dir, hub name)."""

    name: str
    version: str | None = None
    relation: str = ""  # how the child uses it: "trained from", "reward model", ... ("" for the root)
    stage: str = ""
    role: str = ""
    aliases: list[str] = field(default_factory=list)
    run_id: str = ""
    pipeline: str = ""  # the pipeline (experiment) whose run produced it: may differ from its child's
    fingerprint: str = ""
    git_commit: str = ""
    base_model: str = ""
    datasets: dict[str, str] = field(default_factory=dict)
    upstream: list[LineageNode] = field(default_factory=list)

    @property
    def registered(self) -> bool:
        return self.version is not None

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}" if self.registered else self.name


def model_lineage(ref: str) -> LineageNode:
    """The lineage tree of the version ``ref`` names, walked upstream through its lineage tags."""
    return _node(resolve_version(ref), relation="", seen=frozenset())


def _node(version: VersionRef, relation: str, seen: frozenset[VersionRef]) -> LineageNode:
    info = client().get_model_version(version.name, version.version)
    tags = dict(info.tags)
    node = LineageNode(
        name=version.name,
        version=version.version,
        relation=relation,
        stage=tags.get("rlhf.stage", ""),
        role=tags.get("rlhf.role", ""),
        aliases=sorted(getattr(info, "aliases", None) or []),
        run_id=info.run_id or "",
        pipeline=_pipeline_of(info.run_id),
        fingerprint=tags.get(FINGERPRINT_TAG, ""),
        git_commit=tags.get("rlhf.git_commit", ""),
        base_model=tags.get("rlhf.base_model", ""),
        datasets=dataset_digests(tags.get("rlhf.dataset_digests", "")),
    )
    seen = seen | {version}
    children: dict[VersionRef | str, list[str]] = {}
    for tag, what in RELATION_TAGS.items():
        for target in related_models(tags.get(tag, "")):
            children.setdefault(target, []).append(what)  # the SFT model is often upstream and reference
    for target, relations in children.items():
        label = ", ".join(relations)
        if isinstance(target, str):
            node.upstream.append(LineageNode(name=target, relation=label))
        elif target in seen:  # a loop in hand-edited tags: show it, do not follow it
            node.upstream.append(LineageNode(name=f"{target} (cycle)", relation=label))
        else:
            node.upstream.append(_node(target, label, seen))
    return node


def _pipeline_of(run_id: str | None) -> str:
    """The name of the experiment (pipeline) holding a run; "" when the run is gone."""
    if not run_id:
        return ""
    try:
        return run_origin(run_id).pipeline
    except MlflowException:
        return ""


@dataclass
class StageRecord:
    """What one stage of a pipeline run recorded: its run, fingerprint (and its parts) and outputs."""

    stage: str
    run_id: str
    fingerprint: str
    parts: dict[str, str] | None
    outputs: dict[str, StageOutput]
    config: dict


@dataclass
class PipelineRecord:
    """The pipeline run that produced a registered version, as the tracking store holds it."""

    model: VersionRef
    stage: str
    experiment_id: str
    pipeline_run_id: str
    resolved_spec: dict
    stages: dict[str, StageRecord]


def producing_pipeline(ref: str) -> PipelineRecord:
    """Version -> its stage run -> the pipeline run -> resolved spec and every stage's record."""
    version = resolve_version(ref)
    c = client()
    info = c.get_model_version(version.name, version.version)
    if not info.run_id:
        raise UserError(f"model {version}: the version names no MLflow run; it cannot be reproduced")
    stage_run = c.get_run(info.run_id)
    parent_id = stage_run.data.tags.get(PIPELINE_RUN_TAG) or stage_run.data.tags.get("mlflow.parentRunId")
    if not parent_id:
        raise UserError(f"model {version}: its run {info.run_id} has no tag {PIPELINE_RUN_TAG}")
    try:
        spec_text = mlflow.artifacts.load_text(f"runs:/{parent_id}/{RESOLVED_SPEC}")
    except (MlflowException, OSError) as exc:
        raise UserError(
            f"model {version}: pipeline run {parent_id} has no readable {RESOLVED_SPEC} ({exc})"
        ) from None
    resolved = yaml.safe_load(spec_text)
    # The pipeline run's experiment: the version's run may be another's (an interrupted run it resumed).
    experiment_id = c.get_run(parent_id).info.experiment_id
    stages = {name: _stage_record(name, run_id, resolved) for name, run_id in _stage_runs(parent_id).items()}
    _find_consumed_stages(stages, resolved, experiment_id)
    return PipelineRecord(
        model=version,
        stage=stage_run.data.tags.get("rlhf.stage", ""),
        experiment_id=experiment_id,
        pipeline_run_id=parent_id,
        resolved_spec=resolved,
        stages=stages,
    )


def _stage_runs(parent_id: str) -> dict[str, str]:
    """Stage -> the run holding its outputs: the stages this pipeline run ran or resumed (stage runs
    tagged with its id, in any experiment: a resumed run stays in its own) and, from the parent's
    ``stage.<name>`` tags, those it took from cache (runs of earlier pipeline runs, of any pipeline)."""
    c = client()
    found = {}
    children, _ = search_all_experiments(
        f"tags.`{PIPELINE_RUN_TAG}` = '{parent_id}'", order_by=[], max_results=1000
    )
    for run in children:
        if OUTPUT_TAG in run.data.tags and "rlhf.stage" in run.data.tags:
            found[run.data.tags["rlhf.stage"]] = run.info.run_id
    for key, value in c.get_run(parent_id).data.tags.items():
        if key.startswith("stage.") and (match := _STAGE_RUN.search(value)):
            found.setdefault(key.removeprefix("stage."), match["run"])
    return found


def _find_consumed_stages(stages: dict[str, StageRecord], resolved_spec: dict, experiment_id: str) -> None:
    """Fill in stages the pipeline run took from cache but did not list (it failed before it could):
    the newest finished run of that stage whose output a recorded stage consumed (by digest), in the
    pipeline run's experiment, else in any experiment (a result reused from another pipeline)."""
    names = [*(resolved_spec.get("models") or {}), *(resolved_spec.get("stages") or {})]
    found = True
    while found:  # a stage found this way names the inputs it read: upstream of it can be found next
        consumed = {
            digest
            for record in stages.values()
            for key, digest in (record.parts or {}).items()
            if key.startswith("input:")
        }
        found = False
        for name in [n for n in names if n not in stages]:
            for run in _finished_runs_of_stage(name, experiment_id):
                outputs = _OUTPUTS.validate_python(json.loads(run.data.tags.get(OUTPUT_TAG, "{}")))
                if any(ref.digest in consumed for ref in outputs.values()):
                    stages[name] = _stage_record(name, run.info.run_id, resolved_spec)
                    found = True
                    break


def _finished_runs_of_stage(name: str, experiment_id: str):
    """Finished runs of a stage named ``name``, newest first: the experiment's own, then (searched only
    when needed) those of every experiment."""
    query = f"tags.`rlhf.stage` = '{name}' and tags.`{COMPLETE_TAG}` = 'true'"
    order = ["attributes.end_time DESC"]
    yield from client().search_runs([experiment_id], query, order_by=order, max_results=100)
    runs, _ = search_all_experiments(query, order_by=order, max_results=100)
    yield from (run for run in runs if run.info.experiment_id != experiment_id)


def _stage_record(stage: str, run_id: str, resolved_spec: dict) -> StageRecord:
    run = client().get_run(run_id)
    try:
        parts = mlflow.artifacts.load_dict(f"runs:/{run_id}/{FINGERPRINT_PARTS}") or None
    except Exception:  # noqa: BLE001 - a run recorded before fingerprint parts were (no such artifact)
        parts = None
    config = (resolved_spec.get("stages") or {}).get(stage) or (resolved_spec.get("models") or {}).get(stage)
    return StageRecord(
        stage=stage,
        run_id=run_id,
        fingerprint=run.data.tags.get(FINGERPRINT_TAG, ""),
        parts=parts,
        outputs=_OUTPUTS.validate_python(json.loads(run.data.tags.get(OUTPUT_TAG, "{}"))),
        config=config or {},
    )
