"""From a spec and the outputs produced so far to the call of one stage: inputs resolved, checked,
fingerprinted.

One function for the flow (before it calls a task), ``rlhf plan`` and the cache, so none of them can
disagree about what a stage depends on. Nothing here knows a stage kind: inputs are the stage's typed
reference fields, and the fingerprint is :func:`rlhf_core.fingerprint.fingerprint_stage` (computed
from its parts, which the call carries so the stage run records them).
"""

from __future__ import annotations

from rlhf_core.errors import UserError
from rlhf_core.fingerprint import fingerprint_from_parts, fingerprint_parts
from rlhf_core.refs import ModelRef, StageOutput
from rlhf_core.spec import PipelineSpec, resolve_ref
from rlhf_core.spec.pipeline import cap_unwritten, fields_named
from runtime.stage_contract import StageCall

BASE_MODEL_KIND = "base_model"
Outputs = dict[str, dict[str, StageOutput]]


class UpstreamNotReady(LookupError):
    """A stage's input has not been produced (or, for ``plan``, would not come from cache)."""


def base_model_call(spec: PipelineSpec, name: str) -> StageCall:
    """The call of a ``models:`` entry; a registry alias is pinned to the version it names now."""
    source = spec.models[name]
    if source.registered is not None:
        source = source.model_copy(update={"registered": pinned_registered_model(name, source.registered)})
    parts = fingerprint_parts(BASE_MODEL_KIND, source, {}, spec.seed)
    return StageCall(
        name=name,
        kind=BASE_MODEL_KIND,
        stage=source,
        seed=spec.seed,
        fingerprint=fingerprint_from_parts(parts),
        fingerprint_parts=parts,
    )


def stage_call(spec: PipelineSpec, name: str, outputs: Outputs) -> StageCall:
    """The call of stage ``name``; UpstreamNotReady if an input is not in ``outputs`` yet."""
    stage = spec.stages[name]
    inputs: dict[str, StageOutput] = {}
    for path, (reference, expected) in stage.input_refs().items():
        try:
            ref = resolve_ref(reference, outputs)
        except KeyError:
            raise UpstreamNotReady(
                f"stage '{name}', field {path}: '{reference}' is not produced yet"
            ) from None
        if not expected.accepts(ref):
            raise TypeError(
                f"stage '{name}', field {path}: '{reference}' resolved to {ref!r}, not {expected}"
            )
        inputs[path] = ref
    stage = follow_position_limits(stage, inputs)
    check_position_limits(name, stage, inputs)
    seed = spec.stage_seed(name)
    parts = fingerprint_parts(stage.kind, stage, inputs, seed)  # fingerprint_stage, parts kept
    return StageCall(
        name=name,
        kind=stage.kind,
        stage=stage,
        seed=seed,
        fingerprint=fingerprint_from_parts(parts),
        inputs=inputs,
        fingerprint_parts=parts,
    )


def follow_position_limits(stage, inputs: dict[str, StageOutput]):
    """``stage`` with each ``max_length`` the spec leaves out capped at the smallest position limit of
    the models it reads (hub and registry models: known once their base-model stage ran)."""
    limits = [ref.max_positions for ref in inputs.values() if isinstance(ref, ModelRef) and ref.max_positions]
    return cap_unwritten(stage, "max_length", min(limits)) if limits else stage


def check_position_limits(name: str, stage, inputs: dict[str, StageOutput]) -> None:
    """Every ``max_length`` of the stage fits the position limit of every model it reads (when known)."""
    lengths = fields_named(stage, "max_length")
    for path, ref in inputs.items():
        if not isinstance(ref, ModelRef) or ref.max_positions is None:
            continue
        for field, value in lengths.items():
            if value > ref.max_positions:
                raise UserError(
                    f"stage '{name}', field {field}: {value} is longer than model '{ref.stage}' "
                    f"({path}) accepts (max_position_embeddings {ref.max_positions})"
                )


def pinned_registered_model(name: str, reference: str) -> str:
    """``models:/<name>/<version>`` for a registry reference (an alias resolved in the registry now)."""
    from registry.lineage import resolve_version

    try:
        return resolve_version(reference).uri
    except UserError as exc:
        raise UserError(f"model '{name}', field registered: {exc}") from None
