"""Task: the ``policy_gradient`` stage (on-policy RL: REINFORCE, RLOO, PPO, GRPO and variants; registers a
policy version)."""

from __future__ import annotations

from typing import Any

from registry import tracking
from rlhf_core.errors import UserError
from rlhf_core.refs import DatasetRef, ModelRef
from rlhf_core.rewards.scorers import reads_columns
from rlhf_core.spec.monitor import MonitorSpec
from rlhf_core.spec.reward_sources import RewardSourceSpec
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task
from tasks.input_checks import check_reference_tokenizer, check_split
from tasks.model_outputs import describe_model, register_stage_model


def check_policy_gradient(call: StageCall) -> None:
    """The prompts have ``split``; the reference tokenizes like the policy; the monitor's prompts have
    its split (and answers)."""
    stage: PolicyGradientStage = call.stage
    policy, prompts = call.resolve(stage.policy), call.resolve(stage.prompts)
    check_split(call, prompts, stage.split)
    check_reference_tokenizer(call, _reference(call), policy)
    monitor_inputs(call, stage.monitor, prompts, stage.monitor_proxy)


@stage_task(PolicyGradientStage, check=check_policy_gradient)
def optimize_policy(call: StageCall, run: StageRun) -> dict[str, ModelRef]:
    """Train the policy on its own samples of the prompts' ``split``, rewarded by the reward sources."""
    # loads torch only when it runs
    from rlhf_core.training.policy_gradient.stage import PolicyGradientInputs, optimize_on_rollouts

    stage: PolicyGradientStage = call.stage
    policy, prompts = call.resolve(stage.policy), call.resolve(stage.prompts)
    reference = _reference(call)
    value_init = (
        call.resolve(stage.ppo.value_model) if stage.algorithm == "ppo" and stage.ppo.value_model else None
    )
    reward_models = {s.name: call.resolve(s.model) for s in stage.rewards if s.model}
    monitor_prompts, monitor_models = monitor_inputs(call, stage.monitor, prompts, stage.monitor_proxy)
    teacher = call.resolve(stage.distillation.teacher) if stage.distillation is not None else None
    inputs = PolicyGradientInputs(
        run.model_dir(policy), policy.revision, run.read_split(prompts, stage.split),
        reference_dir=run.model_dir(reference) if reference else None,
        reference_revision=reference.revision if reference else None,
        value_init_dir=run.model_dir(value_init) if value_init else None,
        reward_model_dirs={name: run.model_dir(ref) for name, ref in reward_models.items()},
        monitor_rows=run.read_split(monitor_prompts, stage.monitor.split) if stage.monitor else None,
        monitor_model_dirs={name: run.model_dir(ref) for name, ref in monitor_models.items()},
        teacher_dir=run.model_dir(teacher) if teacher else None,
        teacher_revision=teacher.revision if teacher else None,
    )  # fmt: skip
    result = optimize_on_rollouts(stage, inputs, run.environment(call.seed))
    run.key_metrics = result.summary()
    tags = {"rlhf.algorithm": stage.algorithm, **record_monitor(run, result.monitor)}
    if stage.needs_reference:
        tags["rlhf.reference_model"] = describe_model(reference or policy)
    if reward_models:
        tags["rlhf.reward_models"] = ",".join(describe_model(r) for r in reward_models.values())
    if value_init is not None:
        tags["rlhf.value_model_init"] = describe_model(value_init)
    if teacher is not None:
        tags["rlhf.teacher_model"] = describe_model(teacher)
    ref = register_stage_model(
        run, result.model, result.tokenizer,
        registered_name=stage.register_as or f"{run.pipeline}-{call.name}",
        role="policy", base_model=policy.base_model, upstream=policy, data=prompts, extra_tags=tags,
    )  # fmt: skip
    return {"model": ref}


def _reference(call: StageCall) -> ModelRef | None:
    """The reference model, when the algorithm or the monitor needs one and the stage names one."""
    stage: PolicyGradientStage = call.stage
    needs_reference = stage.needs_reference or stage.monitor is not None
    return call.resolve(stage.reference) if stage.reference and needs_reference else None


def monitor_inputs(
    call: StageCall,
    monitor: MonitorSpec | None,
    default_prompts: DatasetRef,
    proxy: tuple[RewardSourceSpec, ...],
) -> tuple[DatasetRef | None, dict[str, ModelRef]]:
    """The over-optimization monitor's prompts dataset (checked to have its split) and its reward models
    by source name; (None, {}) without a monitor."""
    if monitor is None:
        return None, {}
    prompts = call.resolve(monitor.prompts) if monitor.prompts else default_prompts
    if monitor.split not in prompts.splits:
        raise UserError(
            f"stage '{call.name}', field monitor.split: '{monitor.split}' is not a split of "
            f"{prompts.stage}.{prompts.kind} (it has: {', '.join(prompts.splits)}); the monitor needs "
            "held-out prompts: set monitor.prompts / monitor.split"
        )
    sources = (*proxy, *monitor.gold)
    verifiers = [s.function for s in sources if s.function and "answer" in reads_columns(s.function)]
    if verifiers and "answer" not in prompts.columns:
        raise UserError(
            f"stage '{call.name}', field monitor.prompts: the verifier {verifiers[0]} needs prompts with an "
            f"'answer' column, and {prompts.stage}.{prompts.kind} has none (columns: "
            f"{', '.join(prompts.columns)}); set monitor.prompts to a prompts dataset with answers"
        )
    models = {s.name: call.resolve(s.model) for s in (*proxy, *monitor.gold) if s.model}
    return prompts, models


def record_monitor(run: StageRun, summary: dict[str, Any] | None) -> dict[str, str]:
    """The monitor's plots and history as artifacts of the stage run (``monitor/``), its outcome as
    run tags and key metrics; returns the tags for the registered version too."""
    if summary is None:
        return {}
    from rlhf_core.training.monitor.history import Evaluation
    from rlhf_core.training.monitor.plots import draw_monitor_plots

    history = [Evaluation(**e) for e in summary["history"]]
    plots = run.work_dir / "monitor_plots"
    draw_monitor_plots(
        history, plots, title=run.stage, stopped_at=summary["stopped_at_step"],
        registered_step=summary["registered_step"],
    )  # fmt: skip
    tracking.log_artifacts(run.run_id, plots, "monitor")
    tracking.log_dict(run.run_id, summary, "monitor/history.json")
    stopped = summary["stopped_at_step"]
    tags = {
        "rlhf.monitor.stopped_at_step": "none" if stopped is None else str(stopped),
        "rlhf.monitor.best_step": str(summary["best_step"]),
        "rlhf.monitor.registered_step": str(summary["registered_step"]),
        "rlhf.monitor.reason": summary["reason"][:5000],
    }
    tracking.set_tags(run.run_id, tags)
    best = next(e for e in history if e.step == summary["best_step"])
    run.key_metrics |= {"monitor_best_gold": best.gold, "monitor_best_step": float(best.step)}
    if stopped is not None:
        run.key_metrics["monitor_stopped_at_step"] = float(stopped)
    return tags
