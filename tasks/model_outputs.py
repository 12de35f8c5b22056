"""Saving, registering and referencing a model a stage produced (shared by every model stage)."""

from __future__ import annotations

from rlhf_core.refs import DatasetRef, ModelRef
from runtime.stage_contract import StageRun


def describe_model(ref: ModelRef) -> str:
    """'name:version' for a registered model, else its location (local path or hub name)."""
    return f"{ref.registered_name}:{ref.registered_version}" if ref.registered_name else ref.uri


def register_stage_model(
    run: StageRun,
    model,
    tokenizer,
    *,
    registered_name: str,
    role: str,
    base_model: str,
    upstream: ModelRef | None = None,
    data: DatasetRef | None = None,
    extra_tags: dict[str, str] | None = None,
) -> ModelRef:
    """Save the model in the work dir, log it, register a ``candidate`` version with lineage tags.

    Lineage tags: rlhf.stage, rlhf.role, rlhf.fingerprint, rlhf.git_commit, rlhf.spec_digest (the
    resolved spec of the pipeline run), rlhf.package_version, rlhf.base_model and, when
    given, rlhf.upstream_models (the model this one was trained from, ``name:version``; with
    rlhf.upstream_model_uri ``models:/name/version`` when it is registered) and rlhf.dataset_digests.
    The version's description is its model card (``registry.model_cards``).
    """
    from registry.model_cards import refresh_model_card
    from registry.models import log_and_register_model
    from rlhf_core.modeling.digests import model_digest, tokenizer_digest
    from rlhf_core.modeling.models import save_model

    directory = save_model(model, tokenizer, run.work_dir / "model")
    tags = {
        "rlhf.stage": run.stage,
        "rlhf.role": role,
        "rlhf.fingerprint": run.fingerprint,
        "rlhf.git_commit": run.context.git_commit,
        "rlhf.spec_digest": run.context.spec_digest,
        "rlhf.base_model": base_model,
        **(extra_tags or {}),
    }
    if upstream is not None:
        tags["rlhf.upstream_models"] = describe_model(upstream)
        if upstream.registered_name:  # loadable as it is, e.g. mlflow.transformers.load_model(...)
            tags["rlhf.upstream_model_uri"] = (
                f"models:/{upstream.registered_name}/{upstream.registered_version}"
            )
    if data is not None:
        tags["rlhf.dataset_digests"] = f"{data.stage}.{data.kind}={data.digest}"
    uri, version = log_and_register_model(run.run_id, model, tokenizer, registered_name, tags, role=role)
    refresh_model_card(registered_name, version)  # never raises: a card cannot fail the stage
    run.registered = f"{registered_name} v{version}"
    return ModelRef(
        uri=uri,
        digest=model_digest(directory),
        tokenizer_digest=tokenizer_digest(directory),
        role=role,
        stage=run.stage,
        base_model=base_model,
        run_id=run.run_id,
        registered_name=registered_name,
        registered_version=version,
        max_positions=getattr(model.config.get_text_config(), "max_position_embeddings", None),
    )
