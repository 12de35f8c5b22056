"""Task: the ``sft`` stage (supervised fine-tuning; registers a model version)."""

from __future__ import annotations

from rlhf_core.refs import ModelRef
from rlhf_core.spec import SFTStage
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task
from tasks.model_outputs import register_stage_model


@stage_task(SFTStage)
def train_sft(call: StageCall, run: StageRun) -> dict[str, ModelRef]:
    """Fine-tune ``model`` on the train split of ``data``; register the result as ``candidate``."""
    # loads torch only when the stage runs
    from rlhf_core.training.sft.trainer import SFTInputs, supervised_fine_tune

    stage: SFTStage = call.stage
    model, data = call.resolve(stage.model), call.resolve(stage.data)
    inputs = SFTInputs(run.model_dir(model), model.revision, run.read_split(data, "train"))
    result = supervised_fine_tune(stage, inputs, run.environment(call.seed))
    run.key_metrics = result.summary()
    ref = register_stage_model(
        run, result.model, result.tokenizer,
        registered_name=stage.register_as or f"{run.pipeline}-{call.name}",
        role="policy", base_model=model.base_model, upstream=model, data=data,
    )  # fmt: skip
    return {"model": ref}
