"""Task: the ``sft`` stage (supervised fine-tuning; registers a model version, role policy or judge)."""

from __future__ import annotations

from rlhf_core.refs import ModelRef
from rlhf_core.spec import SFTStage
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task
from tasks.model_outputs import register_stage_model


@stage_task(SFTStage)
def train_sft(call: StageCall, run: StageRun) -> dict[str, ModelRef]:
    """Fine-tune ``model`` on the train split of ``data`` and, with ``judge``, on judge prompts and
    verdicts made from the train split of ``judge.preferences``; register the result as ``candidate``
    with the stage's ``register_role``."""
    # loads torch only when the stage runs
    from rlhf_core.training.sft.judge_rows import judge_rows
    from rlhf_core.training.sft.trainer import SFTInputs, supervised_fine_tune

    stage: SFTStage = call.stage
    model = call.resolve(stage.model)
    data = call.resolve(stage.data) if stage.data else None
    rows = run.read_split(data, "train") if data else []
    if stage.judge is not None:
        judged = call.resolve(stage.judge.preferences)
        rows += judge_rows(
            run.read_split(judged, "train"), stage.judge.principles, both_orders=stage.judge.both_orders,
            seed=call.seed,
        )  # fmt: skip
        data = data or judged
    result = supervised_fine_tune(
        stage, SFTInputs(run.model_dir(model), model.revision, rows), run.environment(call.seed)
    )
    run.key_metrics = result.summary()
    ref = register_stage_model(
        run, result.model, result.tokenizer,
        registered_name=stage.register_as or f"{run.pipeline}-{call.name}",
        role=stage.register_role or "policy", base_model=model.base_model, upstream=model, data=data,
    )  # fmt: skip
    return {"model": ref}
