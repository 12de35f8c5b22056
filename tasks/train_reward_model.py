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
        from rlhf_core.modeling.models import load_tokenizer
        from rlhf_core.training import reward_model as rm

        cache = run.settings.resolved_home() / "cache"
        policy_dir = materialize_model(model, cache / "models")
        tokenizer = load_tokenizer(policy_dir, revision=model.revision)  # weights load once, below
        data_dir = materialize_dataset(data, cache / "datasets")
        source = f"stage '{stage_name}' ({data.stage}.{data.kind} train split)"
        trained, result = rm.train_reward_model(
            rm.build_reward_model(policy_dir, tokenizer, revision=model.revision),
            tokenizer,
            read_jsonl(data_dir / "train.jsonl"),
            stage.train,
            seed=seed,
            checkpoint_dir=run.work_dir / "checkpoints",
            source=source,
            log=run.log,
        )
        metrics = {}
        if (data_dir / "eval.jsonl").exists():
            metrics = rm.evaluate_reward_model(
                trained, tokenizer, read_jsonl(data_dir / "eval.jsonl"), stage.train
            )
            tracking.log_metrics(run.run_id, metrics, step=result.steps)
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
        run.key_metrics = {
            "final_train_loss": result.final_loss,
            "steps": float(result.steps),
            "skipped_pairs": float(result.skipped_pairs),
        }
        run.key_metrics.update(
            {
                k.replace("eval/", "heldout_"): v
                for k, v in metrics.items()
                if k in ("eval/accuracy", "eval/margin_mean", "eval/loss")
            }
        )
        return {"model": ref}

    return execute_stage(ctx, stage_name, "reward_model", fingerprint, stage, inputs, body)
