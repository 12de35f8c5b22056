"""The promotion gate: a candidate's evaluation figures checked against declared conditions.

Pure logic, no registry: the ``promote`` task hands in the evaluation report and the current champion's
figures (from the registry) to :func:`decide_promotion` (``run(stage, inputs, env)``), and acts on the
``GateDecision``. A figure is
shown with its bootstrap interval when the report has one (``<metric>_ci_low`` / ``_ci_high``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rlhf_core.errors import UserError
from rlhf_core.spec.stages.promotion import GateCondition, PromoteStage
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.stage_results import StageResult

REPORT_PREFIX = "eval/"


class GateFigureMissing(UserError):
    """A gate condition names a figure the evaluation report does not have."""


@dataclass(frozen=True)
class ConditionCheck:
    """One condition, the figure it read and whether it held, in words."""

    metric: str
    value: float
    passed: bool
    text: str


@dataclass(frozen=True)
class PromotionInputs:
    """The evaluation report (model -> figures) of stage ``report_stage``, and the figures of the current
    champion (None: there is none), called ``champion_label`` in the decision's words."""

    report: Mapping[str, Mapping[str, float]]
    report_stage: str
    champion: Mapping[str, float] | None = None
    champion_label: str = "champion"


@dataclass(frozen=True)
class GateDecision(StageResult):
    passed: bool
    checks: tuple[ConditionCheck, ...]

    def summary(self) -> dict[str, float]:
        return {"promoted": float(self.passed)}

    @property
    def reason(self) -> str:
        """The failed conditions (or, on a pass, every condition), one clause each."""
        shown = self.checks if self.passed else [c for c in self.checks if not c.passed]
        return "; ".join(c.text for c in shown)

    @property
    def figures(self) -> str:
        return "; ".join(c.text for c in self.checks)


def figure(figures: Mapping[str, float], metric: str) -> float | None:
    """A report figure by name, with or without the ``eval/`` prefix."""
    for key in (metric, REPORT_PREFIX + metric.removeprefix(REPORT_PREFIX)):
        if key in figures:
            return float(figures[key])
    return None


def decide_promotion(stage: PromoteStage, inputs: PromotionInputs, env: StageEnvironment) -> GateDecision:
    """The ``promote`` stage's decision: its gate checked on the figures the report has for
    ``stage.model`` (a UserError naming the field when it has none)."""
    if stage.model not in inputs.report:
        evaluated = ", ".join(inputs.report) or "none"
        raise UserError(
            f"stage '{env.stage}', field evaluation: the report of stage '{inputs.report_stage}' has no "
            f"figures for model '{stage.model}' (it evaluated: {evaluated}); add it to its models"
        )
    return evaluate_gate(
        stage.gate, inputs.report[stage.model], inputs.champion, stage=env.stage,
        champion_label=inputs.champion_label,
    )  # fmt: skip


def evaluate_gate(
    conditions: Sequence[GateCondition],
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    *,
    stage: str = "promote",
    champion_label: str = "champion",
) -> GateDecision:
    """Check every condition on the candidate's figures; ``champion`` is None when there is no champion.

    A condition naming a figure the candidate's report lacks is an error (the evaluate stage does not
    measure it), raised with the figures it does have. NaN never passes.
    """
    checks = []
    for i, condition in enumerate(conditions):
        value = figure(candidate, condition.metric)
        if value is None:
            known = ", ".join(sorted(k.removeprefix(REPORT_PREFIX) for k in candidate)) or "none"
            raise GateFigureMissing(
                f"stage '{stage}', field gate[{i}].metric: the evaluation report has no figure "
                f"'{condition.metric}' for this model (it has: {known})"
            )
        checks.append(_check(condition, value, candidate, champion, champion_label))
    return GateDecision(all(c.passed for c in checks), tuple(checks))


def _check(
    condition: GateCondition,
    value: float,
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    champion_label: str,
) -> ConditionCheck:
    name = condition.metric.removeprefix(REPORT_PREFIX)
    shown = f"{name}={_with_interval(value, candidate, condition.metric)}"
    clauses: list[tuple[bool, str]] = []
    finite = not math.isnan(value)
    if condition.min is not None:
        clauses.append((finite and value >= condition.min, f">= {condition.min:g}"))
    if condition.max is not None:
        clauses.append((finite and value <= condition.max, f"<= {condition.max:g}"))
    if condition.max_drop_vs_champion is not None:
        clauses.append(_versus_champion(condition, value, champion, champion_label, finite))
    passed = all(ok for ok, _ in clauses)
    text = f"{shown} " + " and ".join(f"{words} ({'ok' if ok else 'FAILED'})" for ok, words in clauses)
    return ConditionCheck(name, value, passed, text)


def _versus_champion(
    condition: GateCondition,
    value: float,
    champion: Mapping[str, float] | None,
    champion_label: str,
    finite: bool,
) -> tuple[bool, str]:
    tolerance = condition.max_drop_vs_champion
    if champion is None:
        return True, "no champion yet"
    best = figure(champion, condition.metric)
    if best is None:
        return False, f"{champion_label} has no recorded '{condition.metric}' to compare with"
    floor = best - tolerance
    return finite and value >= floor, f">= {champion_label} {best:.4g} - {tolerance:g}"


def _with_interval(value: float, figures: Mapping[str, float], metric: str) -> str:
    low, high = figure(figures, metric + "_ci_low"), figure(figures, metric + "_ci_high")
    if low is None or high is None:
        return f"{value:.4g}"
    return f"{value:.4g} [{low:.4g}, {high:.4g}]"
