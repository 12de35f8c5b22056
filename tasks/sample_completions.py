"""Task: the ``sample`` stage (N completions per prompt, scored by the reward sources)."""

from __future__ import annotations

from prefect import task

from registry import tracking
from registry.datasets import materialize_dataset
from rlhf_core.data.loading import read_jsonl
from rlhf_core.errors import UserError
from rlhf_core.fingerprint import sample_fingerprint
from rlhf_core.refs import DatasetRef, ModelRef
from rlhf_core.spec import SampleStage
from tasks.dataset_outputs import publish_dataset
from tasks.stage_execution import STAGE_TASK_OPTIONS, RunContext, StageOutcome, StageRun, execute_stage

PREVIEW_ROWS = 50


@task(name="sample_completions", **STAGE_TASK_OPTIONS)
def sample_completions(
    ctx: RunContext,
    stage_name: str,
    stage: SampleStage,
    seed: int,
    policy: ModelRef,
    prompts: DatasetRef,
    reward_models: dict[str, ModelRef],
) -> StageOutcome:
    """Sample ``stage.n`` completions for each prompt of ``stage.split`` and score them."""
    inputs = {"policy": policy, "prompts": prompts, **{f"reward:{k}": v for k, v in reward_models.items()}}
    fingerprint = sample_fingerprint(stage, seed, policy, prompts, reward_models)

    def body(run: StageRun) -> dict[str, DatasetRef]:
        # torch and transformers load only when the stage really runs: cached re-runs skip them.
        from registry.models import materialize_model
        from rlhf_core.rollout.sampling import sample_and_score

        cache = run.settings.resolved_home() / "cache"
        if stage.split not in prompts.splits:
            raise UserError(
                f"stage '{stage_name}', field split: '{stage.split}' is not a split of "
                f"{prompts.stage}.{prompts.kind} (it has: {', '.join(prompts.splits)})"
            )
        rows = read_jsonl(materialize_dataset(prompts, cache / "datasets") / f"{stage.split}.jsonl")
        reward_dirs = {name: materialize_model(ref, cache / "models") for name, ref in reward_models.items()}
        policy_dir = materialize_model(policy, cache / "models")
        result = sample_and_score(
            policy_dir, policy.revision, rows, stage, reward_dirs, seed, stage_name=stage_name
        )
        if result.problems:
            tracking.log_text(run.run_id, "\n".join(result.problems), "invalid_rewards.txt")
        splits = {stage.split: result.rows}
        completions = publish_dataset(run, "completions", "completions", splits, columns=result.columns)
        preview = [{k: r[k] for k in ("prompt", "completion", "reward")} for r in result.rows[:PREVIEW_ROWS]]
        tracking.log_table(run.run_id, preview, "completions_preview.json")
        run.key_metrics = result.summary()
        tracking.log_metrics(run.run_id, dict(run.key_metrics), step=0)
        return {"completions": completions}

    return execute_stage(ctx, stage_name, "sample", fingerprint, stage, inputs, body)
