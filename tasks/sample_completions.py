"""Task: the ``sample`` stage (N completions per prompt, scored by the reward sources)."""

from __future__ import annotations

from registry import tracking
from rlhf_core.judging.endpoint_stage_judges import reward_scorers
from rlhf_core.refs import DatasetRef
from rlhf_core.spec import SampleStage
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task
from tasks.dataset_outputs import publish_dataset
from tasks.input_checks import check_split

PREVIEW_ROWS = 50


def check_sample(call: StageCall) -> None:
    """The prompts have ``split``."""
    check_split(call, call.resolve(call.stage.prompts), call.stage.split)


@stage_task(SampleStage, check=check_sample)
def sample_completions(call: StageCall, run: StageRun) -> dict[str, DatasetRef]:
    """Sample ``stage.n`` completions for each prompt of ``stage.split`` and score them."""
    from rlhf_core.rollout.sampling import SampleInputs, sample_and_score  # loads torch only when it runs

    stage: SampleStage = call.stage
    policy, prompts = call.resolve(stage.policy), call.resolve(stage.prompts)
    env = run.environment(call.seed)
    inputs = SampleInputs(
        run.model_dir(policy), policy.revision, run.read_split(prompts, stage.split),
        {s.name: run.model_dir(call.resolve(s.model)) for s in stage.rewards if s.model},
        reward_scorers(stage.rewards, env.cache_dir, call.name),
    )  # fmt: skip
    result = sample_and_score(stage, inputs, env)
    if result.problems:
        tracking.log_text(run.run_id, "\n".join(result.problems), "invalid_rewards.txt")
    splits = {stage.split: result.rows}
    completions = publish_dataset(run, "completions", "completions", splits, columns=result.columns)
    preview = [preview_row(r) for r in result.rows[:PREVIEW_ROWS]]
    tracking.log_table(run.run_id, preview, "completions_preview.json")
    run.key_metrics = result.summary()
    tracking.log_metrics(run.run_id, dict(run.key_metrics), step=0)
    return {"completions": completions}


def preview_row(row: dict) -> dict:
    """A row of the preview table: prompt, completion, reward; an episode's whole conversation as text."""
    from rlhf_core.rollout.episode_sampling import transcript

    shown = {k: row[k] for k in ("prompt", "completion", "reward")}
    if isinstance(row.get("messages"), list) and "outcome" in row:
        shown |= {"turns": row["turns"], "outcome": row["outcome"], "transcript": transcript(row["messages"])}
    return shown
