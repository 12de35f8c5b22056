"""Task: the ``policy_gradient`` stage (on-policy RL: REINFORCE, RLOO, PPO, GRPO and variants; registers a
policy version)."""

from __future__ import annotations

from registry import tracking
from rlhf_core.errors import UserError
from rlhf_core.refs import ModelRef
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from tasks.model_outputs import describe_model, register_stage_model
from tasks.registration import stage_task
from tasks.stage_execution import RunContext, StageCall, StageOutcome, StageRun, execute_stage


@stage_task(PolicyGradientStage)
def optimize_policy(ctx: RunContext, call: StageCall) -> StageOutcome:
    """Train the policy on its own samples of the prompts' ``split``, rewarded by the reward sources."""
    stage: PolicyGradientStage = call.stage
    policy, prompts = call.resolve(stage.policy), call.resolve(stage.prompts)
    if stage.split not in prompts.splits:
        raise UserError(
            f"stage '{call.name}', field split: '{stage.split}' is not a split of "
            f"{prompts.stage}.{prompts.kind} (it has: {', '.join(prompts.splits)})"
        )
    reference = call.resolve(stage.reference) if stage.reference and stage.needs_reference else None
    if reference is not None and reference.tokenizer_digest != policy.tokenizer_digest:
        raise UserError(
            f"stage '{call.name}', field reference: '{stage.reference}' has another tokenizer or chat "
            f"template than the policy '{stage.policy}'; log-probs of the same tokens would not compare"
        )
    value_init = (
        call.resolve(stage.ppo.value_model) if stage.algorithm == "ppo" and stage.ppo.value_model else None
    )
    reward_models = {s.name: call.resolve(s.model) for s in stage.rewards if s.model}

    def body(run: StageRun) -> dict[str, ModelRef]:
        from rlhf_core.training.policy_gradient import run_policy_gradient  # loads torch only when it runs

        def log_samples(rows: list[dict], rollout: int) -> None:
            tracking.log_table(run.run_id, rows, f"samples/rollout_{rollout + 1:05d}.json")

        trained, tokenizer, summary = run_policy_gradient(
            run.model_dir(policy), policy.revision, run.read_split(prompts, stage.split), stage,
            reference_dir=run.model_dir(reference) if reference else None,
            reference_revision=reference.revision if reference else None,
            value_init_dir=run.model_dir(value_init) if value_init else None,
            reward_model_dirs={name: run.model_dir(ref) for name, ref in reward_models.items()},
            seed=call.seed, checkpoint_dir=run.work_dir / "checkpoints", stage_name=call.name, log=run.log,
            log_samples=log_samples,
        )  # fmt: skip
        run.key_metrics = summary_metrics(summary)
        tags = {"rlhf.algorithm": stage.algorithm}
        if stage.needs_reference:
            tags["rlhf.reference_model"] = describe_model(reference or policy)
        if reward_models:
            tags["rlhf.reward_models"] = ",".join(describe_model(r) for r in reward_models.values())
        if value_init is not None:
            tags["rlhf.value_model_init"] = describe_model(value_init)
        ref = register_stage_model(
            ctx, run, trained, tokenizer, registered_name=stage.register_as or f"{ctx.pipeline}-{call.name}",
            role="policy", base_model=policy.base_model, upstream=policy, data=prompts, extra_tags=tags,
        )  # fmt: skip
        return {"model": ref}

    return execute_stage(ctx, call, body)


def summary_metrics(summary: dict) -> dict[str, float]:
    """The run's headline numbers: the last rollout's reward, KL and lengths, and the work done."""
    last = summary["last_metrics"]
    shown = {
        k: float(last[k]) for k in ("reward_mean", "kl", "completion_length", "truncated_share") if k in last
    }
    shown |= {"rollouts": float(summary["rollouts"]), "steps": float(summary["steps"])}
    if summary["resumed_from_step"]:
        shown["resumed_from_step"] = float(summary["resumed_from_step"])
    return shown
