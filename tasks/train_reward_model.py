"""Task: the ``reward_model`` stage (Bradley-Terry RM on a policy backbone; registers role=reward)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from registry import model_metrics, tracking
from registry.model_cards import refresh_model_card
from rlhf_core.refs import ModelRef
from rlhf_core.spec import RewardModelStage
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task
from tasks.model_outputs import register_stage_model


@stage_task(RewardModelStage)
def train_reward_model(call: StageCall, run: StageRun) -> dict[str, ModelRef]:
    """Train on the train split of ``data``, report held-out pairwise accuracy on its eval split (with
    the stage's breakdowns, and the reliability plot under ``plots/`` of the run); the held-out figures
    are linked to the registered version's logged model, so its card lists them."""
    # torch and transformers load only when the stage really runs: cached re-runs skip them.
    from rlhf_core.training.reward_model.trainer import RewardModelInputs, fit_reward_model

    stage: RewardModelStage = call.stage
    model, data = call.resolve(stage.model), call.resolve(stage.data)
    inputs = RewardModelInputs(
        run.model_dir(model), model.revision, run.read_split(data, "train"),
        run.read_split(data, "eval") if "eval" in data.splits else None, f"{data.stage}.{data.kind}",
    )  # fmt: skip
    result = fit_reward_model(stage, inputs, run.environment(call.seed))
    if result.heldout:
        _log_heldout_figures(run, result.heldout, result.reliability, call.name)
    run.key_metrics = result.summary()
    ref = register_stage_model(
        run, result.model, result.tokenizer,
        registered_name=stage.register_as or f"{run.pipeline}-{call.name}",
        role="reward", base_model=model.base_model, upstream=model, data=data,
    )  # fmt: skip
    if result.heldout:  # on the run and on its logged model: the version's card lists them
        if not model_metrics.log_model_metrics(run.run_id, ref.uri, result.heldout):
            tracking.log_metrics(run.run_id, result.heldout, step=result.steps)
        elif ref.registered_name:
            refresh_model_card(ref.registered_name, ref.registered_version)
    return {"model": ref}


def _log_heldout_figures(run: StageRun, metrics: dict[str, float], bins: list, stage: str) -> None:
    """The reliability plot and the breakdown file, as artifacts under ``plots/`` of the stage's run."""
    from rlhf_core.evaluation.reward_model_figures import write_reward_model_figures

    with tempfile.TemporaryDirectory(prefix="rlhf-rm-plots-") as tmp:
        write_reward_model_figures(metrics, bins, Path(tmp), title=f"reward model '{stage}'")
        tracking.log_artifacts(run.run_id, Path(tmp), "plots")
