"""Task: the ``reward_model`` stage (Bradley-Terry RM on a policy backbone; registers role=reward)."""

from __future__ import annotations

from prefect import task

from registry.datasets import materialize_dataset
from rlhf_core.data.loading import read_jsonl
from rlhf_core.fingerprint import reward_model_fingerprint
from rlhf_core.refs import DatasetRef, ModelRef
from rlhf_core.spec import RewardModelStage
from tasks.model_outputs import register_stage_model
from tasks.stage_execution import STAGE_TASK_OPTIONS, RunContext, StageOutcome, StageRun, execute_stage


@task(name="train_reward_model", **STAGE_TASK_OPTIONS)
def train_reward_model(
    ctx: RunContext, stage_name: str, stage: RewardModelStage, seed: int, model: ModelRef, data: DatasetRef
) -> StageOutcome:
    """Train on the train split of ``data``, report held-out pairwise accuracy on its eval split."""
    inputs = {"model": model, "data": data}
    fingerprint = reward_model_fingerprint(stage, seed, model, data)

    def body(run: StageRun) -> dict[str, ModelRef]:
        # torch and transformers load only when the stage really runs: cached re-runs skip them.
        from registry import tracking
        from registry.models import materialize_model
        from rlhf_core.training.reward_model import train_and_evaluate_reward_model

        cache = run.settings.resolved_home() / "cache"
        data_dir = materialize_dataset(data, cache / "datasets")
        eval_file = data_dir / "eval.jsonl"
        trained, tokenizer, result = train_and_evaluate_reward_model(
            materialize_model(model, cache / "models"),
            model.revision,
            read_jsonl(data_dir / "train.jsonl"),
            read_jsonl(eval_file) if eval_file.exists() else None,
            stage.train,
            seed=seed,
            checkpoint_dir=run.work_dir / "checkpoints",
            source=f"stage '{stage_name}' ({data.stage}.{data.kind} train split)",
            log=run.log,
        )
        if result.heldout:
            tracking.log_metrics(run.run_id, result.heldout, step=result.steps)
        ref = register_stage_model(
            ctx,
            run,
            trained,
            tokenizer,
            registered_name=stage.register_as or f"{ctx.pipeline}-{stage_name}",
            role="reward",
            base_model=model.base_model,
            upstream=model,
            data=data,
        )
        run.key_metrics = result.summary()
        return {"model": ref}

    return execute_stage(ctx, stage_name, "reward_model", fingerprint, stage, inputs, body)
