"""Task: the ``reward_model`` stage (Bradley-Terry RM on a policy backbone; registers role=reward)."""

from __future__ import annotations

from registry import tracking
from rlhf_core.refs import ModelRef
from rlhf_core.spec import RewardModelStage
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task
from tasks.model_outputs import register_stage_model


@stage_task(RewardModelStage)
def train_reward_model(call: StageCall, run: StageRun) -> dict[str, ModelRef]:
    """Train on the train split of ``data``, report held-out pairwise accuracy on its eval split."""
    # torch and transformers load only when the stage really runs: cached re-runs skip them.
    from rlhf_core.training.reward_model.trainer import train_and_evaluate_reward_model

    stage: RewardModelStage = call.stage
    model, data = call.resolve(stage.model), call.resolve(stage.data)
    trained, tokenizer, result = train_and_evaluate_reward_model(
        run.model_dir(model), model.revision, run.read_split(data, "train"),
        run.read_split(data, "eval") if "eval" in data.splits else None, stage.train,
        seed=call.seed, checkpoint_dir=run.work_dir / "checkpoints", log=run.log,
        source=f"stage '{call.name}' ({data.stage}.{data.kind} train split)",
    )  # fmt: skip
    if result.heldout:
        tracking.log_metrics(run.run_id, result.heldout, step=result.steps)
    run.key_metrics = result.summary()
    ref = register_stage_model(
        run, trained, tokenizer, registered_name=stage.register_as or f"{run.pipeline}-{call.name}",
        role="reward", base_model=model.base_model, upstream=model, data=data,
    )  # fmt: skip
    return {"model": ref}
