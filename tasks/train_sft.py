"""Task: the ``sft`` stage (supervised fine-tuning; registers a model version)."""

from __future__ import annotations

from prefect import task

from registry.datasets import materialize_dataset
from rlhf_core.data.loading import read_jsonl
from rlhf_core.fingerprint import sft_fingerprint
from rlhf_core.refs import DatasetRef, ModelRef
from rlhf_core.spec import SFTStage
from tasks.model_outputs import register_stage_model
from tasks.stage_execution import STAGE_TASK_OPTIONS, RunContext, StageOutcome, StageRun, execute_stage


@task(name="train_sft", **STAGE_TASK_OPTIONS)
def train_sft(
    ctx: RunContext, stage_name: str, stage: SFTStage, seed: int, model: ModelRef, data: DatasetRef
) -> StageOutcome:
    """Fine-tune ``model`` on the train split of ``data``; register the result as ``candidate``."""
    inputs = {"model": model, "data": data}
    fingerprint = sft_fingerprint(stage, seed, model, data)

    def body(run: StageRun) -> dict[str, ModelRef]:
        # torch and transformers load only when the stage really runs: cached re-runs skip them.
        from registry.models import materialize_model
        from rlhf_core.modeling.models import load_model
        from rlhf_core.training.sft import train_sft as run_sft_training

        cache = run.settings.resolved_home() / "cache"
        base, tokenizer = load_model(materialize_model(model, cache / "models"), revision=model.revision)
        records = read_jsonl(materialize_dataset(data, cache / "datasets") / "train.jsonl")
        trained, result = run_sft_training(
            base,
            tokenizer,
            records,
            stage.train,
            seed=seed,
            checkpoint_dir=run.work_dir / "checkpoints",
            lora=stage.lora,
            log=run.log,
        )
        ref = register_stage_model(
            ctx,
            run,
            trained,
            tokenizer,
            registered_name=stage.register_as or f"{ctx.pipeline}-{stage_name}",
            role="policy",
            base_model=model.base_model,
            upstream=model,
            data=data,
        )
        run.key_metrics = {
            "final_train_loss": result.final_loss,
            "steps": float(result.steps),
            "tokens_per_second": result.tokens_per_second,
        }
        if result.resumed_from_step:
            run.key_metrics["resumed_from_step"] = float(result.resumed_from_step)
        return {"model": ref}

    return execute_stage(ctx, stage_name, "sft", fingerprint, stage, inputs, body)
