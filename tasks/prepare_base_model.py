"""Task: materialize a ``models:`` entry (build a tiny model, point at a local dir / hub name, or
download a registered version)."""

from __future__ import annotations

from rlhf_core.errors import UserError
from rlhf_core.modeling.digests import model_digest, tokenizer_digest
from rlhf_core.modeling.position_limits import max_positions
from rlhf_core.refs import ModelRef
from rlhf_core.spec import ModelSource
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task
from tasks.model_outputs import register_stage_model


@stage_task(ModelSource, kind="base_model")  # flows.stage_calls.BASE_MODEL_KIND: ModelSource has no kind
def prepare_base_model(call: StageCall, run: StageRun) -> dict[str, ModelRef]:
    """A tiny model is built, logged and registered (``<pipeline>-<name>``); local and hub models are
    referenced in place (their weights are not copied into MLflow); a registered version is downloaded
    into the home's model cache and keeps its registry name and version (lineage, promotion)."""
    # torch and transformers load only when the stage really runs: cached re-runs skip them.
    from rlhf_core.modeling.models import build_tiny_model

    source: ModelSource = call.stage
    if source.tiny is None:
        return {"model": _external_model_ref(call.name, source, run)}
    extra = None
    if source.tiny.tokenizer_corpus == "arithmetic_tools":
        from rlhf_core.environments.tool_arithmetic import tool_use_corpus

        extra = tool_use_corpus(seed=call.seed)
    model, tokenizer = build_tiny_model(source.tiny, call.seed, extra)
    ref = register_stage_model(
        run, model, tokenizer, registered_name=f"{run.pipeline}-{call.name}", role="policy",
        base_model=call.name, extra_tags={"rlhf.source": "tiny"},
    )  # fmt: skip
    run.key_metrics = {"parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}
    return {"model": ref}


def _external_model_ref(name: str, source: ModelSource, run: StageRun) -> ModelRef:
    if source.registered:
        return _registered_model_ref(name, source.registered, run)
    if source.path:
        return ModelRef(
            uri=source.path,
            digest=model_digest(source.path),
            tokenizer_digest=tokenizer_digest(source.path),
            stage=name,
            base_model=source.path,
            run_id=run.run_id,
            max_positions=max_positions(source.path),
        )
    pinned = f"{source.hub}@{source.revision or 'main'}"
    return ModelRef(
        uri=source.hub or "",
        revision=source.revision,
        digest=pinned,
        tokenizer_digest=pinned,
        stage=name,
        base_model=pinned,
        run_id=run.run_id,
        max_positions=max_positions(source.hub or "", source.revision),
    )


def _registered_model_ref(name: str, uri: str, run: StageRun) -> ModelRef:
    """A registered policy version (``models:/<name>/<version>``, pinned by the flow), downloaded once."""
    import hashlib
    import os
    from pathlib import Path

    from registry.models import model_version_tags

    registered_name, _, version = uri.removeprefix("models:/").rpartition("/")
    tags = model_version_tags(registered_name, version)
    role = tags.get("rlhf.role", "policy")
    if role != "policy":
        raise UserError(
            f"model '{name}', field registered: {uri} is a {role} model; `models:` entries are policies"
        )
    pinned = hashlib.sha256(uri.encode()).hexdigest()  # a registered version never changes
    download = ModelRef(uri=uri, digest=pinned, tokenizer_digest=pinned, stage=name, base_model=uri)
    directory = Path(run.model_dir(download))
    digest = model_digest(directory)
    kept = directory.with_name(digest[:32])  # where later stages look for this ref's weights
    if not kept.exists():
        os.replace(directory, kept)
    run.registered = f"{registered_name} v{version} (used as is)"
    return ModelRef(
        uri=uri,
        digest=digest,
        tokenizer_digest=tokenizer_digest(kept),
        stage=name,
        base_model=tags.get("rlhf.base_model", uri),
        run_id=run.run_id,
        registered_name=registered_name,
        registered_version=version,
        max_positions=max_positions(str(kept)),
    )
