"""Task: materialize a ``models:`` entry (build a tiny model, or point at a local dir / hub name)."""

from __future__ import annotations

from prefect import task

from rlhf_core.modeling.digests import model_digest, tokenizer_digest
from rlhf_core.modeling.position_limits import max_positions
from rlhf_core.refs import ModelRef
from rlhf_core.spec import ModelSource
from tasks.model_outputs import register_stage_model
from tasks.stage_execution import (
    STAGE_TASK_OPTIONS,
    RunContext,
    StageCall,
    StageOutcome,
    StageRun,
    execute_stage,
)


@task(name="prepare_base_model", **STAGE_TASK_OPTIONS)
def prepare_base_model(ctx: RunContext, call: StageCall) -> StageOutcome:
    """A tiny model is built, logged and registered (``<pipeline>-<name>``); local and hub models are
    referenced in place (their weights are not copied into MLflow)."""
    source: ModelSource = call.stage

    def body(run: StageRun) -> dict[str, ModelRef]:
        # torch and transformers load only when the stage really runs: cached re-runs skip them.
        from rlhf_core.modeling.models import build_tiny_model

        if source.tiny is None:
            return {"model": _external_model_ref(call.name, source, run)}
        model, tokenizer = build_tiny_model(source.tiny, call.seed)
        ref = register_stage_model(
            ctx, run, model, tokenizer, registered_name=f"{ctx.pipeline}-{call.name}", role="policy",
            base_model=call.name, extra_tags={"rlhf.source": "tiny"},
        )  # fmt: skip
        run.key_metrics = {"parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}
        return {"model": ref}

    return execute_stage(ctx, call, body)


def _external_model_ref(name: str, source: ModelSource, run: StageRun) -> ModelRef:
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
