"""Task: the ``constitutional_revision`` stage (critique-and-revise SFT and preference data, book ch.12)."""

from __future__ import annotations

from dataclasses import replace

from registry import tracking
from rlhf_core.refs import DatasetRef
from rlhf_core.spec.stages.constitutional import ConstitutionalRevisionStage
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task
from tasks.dataset_outputs import publish_dataset
from tasks.input_checks import check_split

PREVIEW_ROWS = 50


def check_revision(call: StageCall) -> None:
    """The prompts have ``split``."""
    check_split(call, call.resolve(call.stage.prompts), call.stage.split)


@stage_task(ConstitutionalRevisionStage, check=check_revision)
def revise_constitutionally(call: StageCall, run: StageRun) -> dict[str, DatasetRef]:
    """Answer each prompt, critique and revise the answer under sampled principles, publish the final
    answers as SFT data and (final over first) as preference pairs."""
    from rlhf_core.judging import constitutional  # loads torch only when the stage runs

    stage: ConstitutionalRevisionStage = call.stage
    policy, prompts = call.resolve(stage.policy), call.resolve(stage.prompts)
    inputs = constitutional.ConstitutionalInputs(
        run.model_dir(policy), policy.revision, run.read_split(prompts, stage.split)
    )
    if stage.critic is not None:
        critic = call.resolve(stage.critic)
        inputs = replace(inputs, critic_dir=run.model_dir(critic), critic_revision=critic.revision)
    result = constitutional.run_constitutional_revision(stage, inputs, run.environment(call.seed))
    if result.problems:
        tracking.log_text(run.run_id, "\n".join(result.problems), "dropped_revisions.txt")
    preview = [row for rows in result.sft.values() for row in rows][:PREVIEW_ROWS]
    tracking.log_table(run.run_id, preview, "revisions_preview.json")
    sft = publish_dataset(run, "sft", "sft", result.sft, columns=constitutional.SFT_COLUMNS)
    pairs = publish_dataset(
        run, "preferences", "preference", result.preferences, columns=constitutional.PAIR_COLUMNS
    )
    run.key_metrics = result.summary()
    tracking.log_metrics(run.run_id, dict(run.key_metrics), step=0)
    return {"sft": sft, "preferences": pairs}
