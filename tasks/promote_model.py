"""Task: the ``promote`` stage (gate a registered model on its evaluation, move the champion alias)."""

from __future__ import annotations

from registry import promotion, tracking
from registry.model_cards import refresh_model_card
from registry.model_metrics import version_metrics
from rlhf_core.errors import UserError
from rlhf_core.evaluation.gate import PromotionInputs, decide_promotion
from rlhf_core.refs import EvalReportRef, ModelRef, PromotionRef
from rlhf_core.spec.stages.promotion import PromoteStage
from runtime.stage_contract import StageCall, StageRun
from runtime.stage_tasks import stage_task


@stage_task(PromoteStage)
def promote_model(call: StageCall, run: StageRun) -> dict[str, PromotionRef]:
    """Check the gate on the candidate's figures; on a pass move ``alias``, else tag the version why not.

    The champion's figures for ``max_drop_vs_champion`` are the metrics of the champion version's
    logged model (what its evaluation recorded). The decision is the stage's output; ``rlhf run``
    exits with status 3 when it is a rejection.
    """
    stage: PromoteStage = call.stage

    model: ModelRef = call.resolve(stage.model)
    report: EvalReportRef = call.resolve(stage.evaluation)
    name, version = _registered(call.name, stage.model, model)
    champion = promotion.alias_version(name, stage.alias)
    inputs = PromotionInputs(
        report.metrics, report.stage, version_metrics(name, champion) if champion is not None else None,
        champion_label=f"{stage.alias} v{champion}",
    )  # fmt: skip
    decision = decide_promotion(stage, inputs, run.environment(call.seed))
    tags = {
        promotion.GATE_DECISION_TAG: "passed" if decision.passed else "failed",
        promotion.GATE_REASON_TAG: decision.reason,
        promotion.GATE_FIGURES_TAG: decision.figures,
        promotion.GATE_STAGE_TAG: f"{run.pipeline}.{call.name} (run {run.run_id})",
    }
    previous = None
    if decision.passed:
        previous = promotion.promote(
            name,
            version,
            alias=stage.alias,
            previous_alias=stage.previous_alias,
            by=f"{run.pipeline}.{call.name}",
            tags=tags,
        )
    else:
        promotion.record_rejection(name, version, tags)
    for touched in (version, previous):
        if touched is not None:
            refresh_model_card(name, touched)  # the cards show aliases and the gate's decision
    tracking.set_tags(run.run_id, {**tags, "rlhf.candidate": f"{name} v{version}"})
    tracking.log_text(run.run_id, _decision_text(name, version, stage, decision, previous), "decision.md")
    run.key_metrics = decision.summary()
    return {
        "decision": PromotionRef(
            stage=call.name,
            registered_name=name,
            registered_version=version,
            alias=stage.alias,
            passed=decision.passed,
            reason=decision.reason,
            previous_version=previous,
            run_id=run.run_id,
        )
    }


def _registered(stage_name: str, reference: str, model: ModelRef) -> tuple[str, str]:
    if not model.registered_name or not model.registered_version:
        raise UserError(
            f"stage '{stage_name}', field model: '{reference}' is not a registered model version "
            f"({model.uri}); promote the model of a training stage"
        )
    return model.registered_name, model.registered_version


def _decision_text(name: str, version: str, stage: PromoteStage, decision, previous: str | None) -> str:
    verdict = (
        f"**passed**: `{stage.alias}` -> {name} v{version}"
        + (f" (v{previous} is now `{stage.previous_alias}`)" if previous else "")
        if decision.passed
        else f"**failed**: no alias moved; {name} v{version} stays a candidate"
    )
    lines = [f"# Promotion gate: {name} v{version}", "", verdict, "", "| condition | held |", "|---|---|"]
    lines += [f"| {c.text} | {'yes' if c.passed else 'no'} |" for c in decision.checks]
    return "\n".join(lines) + "\n"
