"""Task: the ``direct_alignment`` stage (DPO and its family; registers a policy version)."""

from __future__ import annotations

from rlhf_core.refs import ModelRef
from rlhf_core.spec.reward_sources import RewardSourceSpec
from rlhf_core.spec.stages.direct_alignment import DirectAlignmentStage
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task
from tasks.input_checks import check_reference_tokenizer
from tasks.model_outputs import describe_model, register_stage_model
from tasks.optimize_policy import monitor_inputs, record_monitor


def check_direct_alignment(call: StageCall) -> None:
    """The reference tokenizes like the policy; the monitor's prompts have its split (and answers)."""
    stage: DirectAlignmentStage = call.stage
    policy = call.resolve(stage.policy)
    check_reference_tokenizer(call, call.resolve(stage.reference) if stage.reference else None, policy)
    monitor_inputs(call, stage.monitor, call.resolve(stage.data or stage.unpaired_data), _proxy(stage))


@stage_task(DirectAlignmentStage, check=check_direct_alignment)
def optimize_preferences(call: StageCall, run: StageRun) -> dict[str, ModelRef]:
    """Optimise the policy on the train split of the preference data; held-out metrics on its eval split."""
    # loads torch only when the stage runs
    from rlhf_core.training.direct_alignment.trainer import DirectAlignmentInputs, optimize_on_preferences

    stage: DirectAlignmentStage = call.stage
    policy, data = call.resolve(stage.policy), call.resolve(stage.data or stage.unpaired_data)
    reference = call.resolve(stage.reference) if stage.reference else None
    monitor_prompts, monitor_models = monitor_inputs(call, stage.monitor, data, _proxy(stage))
    inputs = DirectAlignmentInputs(
        run.model_dir(policy), policy.revision, run.read_split(data, "train"),
        run.read_split(data, "eval") if "eval" in data.splits else None,
        reference_digest=(reference or policy).digest, data_digest=data.digest,
        data_name=f"{data.stage}.{data.kind}",
        reference_dir=run.model_dir(reference) if reference else None,
        reference_revision=reference.revision if reference else None,
        monitor_rows=run.read_split(monitor_prompts, stage.monitor.split) if stage.monitor else None,
        monitor_model_dirs={name: run.model_dir(ref) for name, ref in monitor_models.items()},
    )  # fmt: skip
    result = optimize_on_preferences(stage, inputs, run.environment(call.seed))
    if result.heldout:
        run.log(result.heldout, result.steps)
    run.key_metrics = result.summary()
    monitor_tags = record_monitor(run, result.monitor)
    ref = register_stage_model(
        run, result.model, result.tokenizer,
        registered_name=stage.register_as or f"{run.pipeline}-{call.name}",
        role="policy", base_model=policy.base_model, upstream=policy, data=data,
        extra_tags={"rlhf.reference_model": describe_model(reference or policy), **monitor_tags},
    )  # fmt: skip
    return {"model": ref}


def _proxy(stage: DirectAlignmentStage) -> tuple[RewardSourceSpec, ...]:
    """The monitor's proxy reward sources (none without a monitor)."""
    return stage.monitor.proxy if stage.monitor else ()
