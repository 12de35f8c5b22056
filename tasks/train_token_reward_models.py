"""Tasks: the ``outcome_reward_model`` and ``process_reward_model`` stages (per-token reward heads on a
policy backbone, book ch.5; both register role=reward)."""

from __future__ import annotations

from registry import tracking
from rlhf_core.refs import ModelRef
from rlhf_core.spec.stages.outcome_process_rewards import OutcomeRewardModelStage, ProcessRewardModelStage
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task
from tasks.model_outputs import register_stage_model


def _inputs(call: StageCall, run: StageRun):
    from rlhf_core.training.token_reward_model.trainer import TokenRewardInputs

    model, data = call.resolve(call.stage.model), call.resolve(call.stage.data)
    inputs = TokenRewardInputs(
        run.model_dir(model), model.revision, run.read_split(data, "train"),
        run.read_split(data, "eval") if "eval" in data.splits else None, f"{data.stage}.{data.kind}",
    )  # fmt: skip
    return model, data, inputs


def _register(call: StageCall, run: StageRun, result, model: ModelRef, data) -> dict[str, ModelRef]:
    if result.heldout:
        tracking.log_metrics(run.run_id, result.heldout, step=result.steps)
    run.key_metrics = result.summary()
    ref = register_stage_model(
        run, result.model, result.tokenizer,
        registered_name=call.stage.register_as or f"{run.pipeline}-{call.name}",
        role="reward", base_model=model.base_model, upstream=model, data=data,
    )  # fmt: skip
    return {"model": ref}


@stage_task(OutcomeRewardModelStage)
def train_outcome_reward_model(call: StageCall, run: StageRun) -> dict[str, ModelRef]:
    """Train an ORM on the train split of ``data``; report top-1 and pairwise accuracy on its eval split."""
    # torch and transformers load only when the stage really runs: cached re-runs skip them.
    from rlhf_core.training.token_reward_model.trainer import fit_outcome_reward_model

    model, data, inputs = _inputs(call, run)
    result = fit_outcome_reward_model(call.stage, inputs, run.environment(call.seed))
    return _register(call, run, result, model, data)


@stage_task(ProcessRewardModelStage)
def train_process_reward_model(call: StageCall, run: StageRun) -> dict[str, ModelRef]:
    """Train a PRM on the train split of ``data``; report step and solution accuracy on its eval split."""
    from rlhf_core.training.token_reward_model.trainer import fit_process_reward_model

    model, data, inputs = _inputs(call, run)
    result = fit_process_reward_model(call.stage, inputs, run.environment(call.seed))
    return _register(call, run, result, model, data)
