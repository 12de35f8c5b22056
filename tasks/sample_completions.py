"""Task: the ``sample`` stage (N completions per prompt, scored by the reward sources)."""

from __future__ import annotations

from registry import tracking
from rlhf_core.errors import UserError
from rlhf_core.refs import DatasetRef
from rlhf_core.spec import SampleStage
from runtime.stage_contract import RunContext, StageCall, StageOutcome, StageRun
from runtime.stage_execution import execute_stage
from runtime.stage_tasks import stage_task
from tasks.dataset_outputs import publish_dataset

PREVIEW_ROWS = 50


@stage_task(SampleStage)
def sample_completions(ctx: RunContext, call: StageCall) -> StageOutcome:
    """Sample ``stage.n`` completions for each prompt of ``stage.split`` and score them."""
    stage: SampleStage = call.stage
    policy, prompts = call.resolve(stage.policy), call.resolve(stage.prompts)
    if stage.split not in prompts.splits:
        raise UserError(
            f"stage '{call.name}', field split: '{stage.split}' is not a split of "
            f"{prompts.stage}.{prompts.kind} (it has: {', '.join(prompts.splits)})"
        )

    def body(run: StageRun) -> dict[str, DatasetRef]:
        from rlhf_core.rollout.sampling import sample_and_score  # loads torch only when the stage runs

        reward_dirs = {s.name: run.model_dir(call.resolve(s.model)) for s in stage.rewards if s.model}
        result = sample_and_score(
            run.model_dir(policy), policy.revision, run.read_split(prompts, stage.split), reward_dirs,
            call.seed, n=stage.n, max_prompts=stage.max_prompts, sampling=stage.generation,
            rewards=stage.rewards, on_invalid=stage.on_invalid_reward, stage_name=call.name,
        )  # fmt: skip
        if result.problems:
            tracking.log_text(run.run_id, "\n".join(result.problems), "invalid_rewards.txt")
        splits = {stage.split: result.rows}
        completions = publish_dataset(run, "completions", "completions", splits, columns=result.columns)
        preview = [{k: r[k] for k in ("prompt", "completion", "reward")} for r in result.rows[:PREVIEW_ROWS]]
        tracking.log_table(run.run_id, preview, "completions_preview.json")
        run.key_metrics = result.summary()
        tracking.log_metrics(run.run_id, dict(run.key_metrics), step=0)
        return {"completions": completions}

    return execute_stage(ctx, call, body)
