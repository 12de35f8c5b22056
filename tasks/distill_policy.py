"""Task: the ``distill`` stage (token-level knowledge distillation; registers the student as a policy)."""

from __future__ import annotations

from rlhf_core.refs import ModelRef
from rlhf_core.spec.stages.distillation import DistillStage
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task
from tasks.model_outputs import describe_model, register_stage_model


@stage_task(DistillStage)
def distill_policy(call: StageCall, run: StageRun) -> dict[str, ModelRef]:
    """Distil ``teacher`` into ``student`` on the train split of ``data`` (the divergence to the teacher
    measured on its eval split, when it has one); register the student as a ``candidate`` policy."""
    # loads torch only when the stage runs
    from rlhf_core.training.distillation.trainer import DistillInputs, distill_student

    stage: DistillStage = call.stage
    student, teacher, data = (
        call.resolve(stage.student),
        call.resolve(stage.teacher),
        call.resolve(stage.data),
    )
    inputs = DistillInputs(
        run.model_dir(student), student.revision, run.model_dir(teacher), teacher.revision,
        run.read_split(data, "train"), run.read_split(data, "eval") if "eval" in data.splits else None,
        student_name=stage.student, teacher_name=stage.teacher,
    )  # fmt: skip
    result = distill_student(stage, inputs, run.environment(call.seed))
    if result.heldout:
        run.log(result.heldout, result.steps)
    run.key_metrics = result.summary()
    ref = register_stage_model(
        run, result.model, result.tokenizer,
        registered_name=stage.register_as or f"{run.pipeline}-{call.name}",
        role="policy", base_model=student.base_model, upstream=student, data=data,
        extra_tags={"rlhf.teacher_model": describe_model(teacher)},
    )  # fmt: skip
    return {"model": ref}
