"""Task: the ``sample`` stage (N completions per prompt, scored by the reward sources)."""

from __future__ import annotations

import statistics

from prefect import task

from registry import tracking
from registry.datasets import materialize_dataset
from rlhf_core.data.loading import read_jsonl
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
        from rlhf_core.modeling.models import load_model
        from rlhf_core.rewards.composite import score_completions
        from rlhf_core.rewards.reward_model_scoring import load_reward_model_scorers
        from rlhf_core.rollout.sampling import sample_completions as sample

        cache = run.settings.resolved_home() / "cache"
        if stage.split not in prompts.splits:
            raise ValueError(
                f"stage '{stage_name}', field split: '{stage.split}' is not a split of "
                f"{prompts.stage}.{prompts.kind} (it has: {', '.join(prompts.splits)})"
            )
        rows = read_jsonl(materialize_dataset(prompts, cache / "datasets") / f"{stage.split}.jsonl")
        rows = rows[: stage.max_prompts] if stage.max_prompts else rows
        model, tokenizer = load_model(materialize_model(policy, cache / "models"), revision=policy.revision)
        sampled, tokens, seconds = sample(model, tokenizer, rows, stage.n, stage.generation, seed)
        scorers = load_reward_model_scorers(
            {k: materialize_model(v, cache / "models") for k, v in reward_models.items()}
        )
        kept, problems = score_completions(
            sampled, stage.rewards, scorers, on_invalid=stage.on_invalid_reward, stage=stage_name
        )
        if problems:
            tracking.log_text(run.run_id, "\n".join(problems), "invalid_rewards.txt")
        columns = tuple(sorted(set.intersection(*(set(r) for r in kept)))) if kept else ()
        completions = publish_dataset(run, "completions", "completions", {stage.split: kept}, columns=columns)
        tracking.log_table(
            run.run_id,
            [{k: r[k] for k in ("prompt", "completion", "reward")} for r in kept[:PREVIEW_ROWS]],
            "completions_preview.json",
        )
        rewards = [r["reward"] for r in kept]
        run.key_metrics = {
            "completions": float(len(kept)),
            "dropped": float(len(problems)),
            "reward_mean": statistics.fmean(rewards) if rewards else float("nan"),
            "reward_std": statistics.pstdev(rewards) if rewards else float("nan"),
            "new_tokens_per_second": tokens / seconds if seconds else 0.0,
        }
        tracking.log_metrics(run.run_id, dict(run.key_metrics), step=0)
        return {"completions": completions}

    return execute_stage(ctx, stage_name, "sample", fingerprint, stage, inputs, body)
