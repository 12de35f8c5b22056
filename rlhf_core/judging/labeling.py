"""The ``label_preferences`` stage's work: judge sampled completions, pair them per prompt.

Three kinds of judge (the stage has exactly one):

- reward sources (verifiers, reward models, endpoint judges, a weighted mix) score every completion;
  pairs are ranked by score (:func:`~rlhf_core.judging.preferences.label_pairs`);
- a policy model judges pairs of completions against written principles, in both orders
  (:mod:`~rlhf_core.judging.policy_judge`), decoding with the engine its ``engine`` names (``vllm``:
  one engine started from the judge model for the stage, its log ``<work dir>/vllm-server.log``);
- a judge model behind an OpenAI-compatible endpoint, pairwise or pointwise
  (:mod:`~rlhf_core.judging.endpoint_stage_judges`), its answers cached in ``<home>/cache/judge``.

A pairwise judge (policy or endpoint) sees every principle, or with ``principles_per_comparison: k`` a
subset of k drawn per pair (seeded by the stage seed and the pair's texts; Constitutional AI's feedback
model, book ch.12), recorded in each pair's ``principles`` column.

Entry point: :func:`label_preferences` (``run(stage, inputs, env)``): the pairs, split by the stage's
``splits``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rlhf_core.data.loading import split_records
from rlhf_core.errors import UserError
from rlhf_core.judging.endpoint_stage_judges import judge_cache, label_with_endpoint, reward_scorers
from rlhf_core.judging.policy_judge import judge_pairs, open_policy_judge, principle_subsets
from rlhf_core.judging.preferences import PairingReport, candidate_pairs, label_pairs, pairs_from_verdicts
from rlhf_core.rewards.composite import model_source_options, score_completions
from rlhf_core.rewards.reward_model_scoring import load_reward_model_scorers
from rlhf_core.spec import LabelPreferencesStage
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.stage_results import StageResult

POLICY_JUDGE = "policy"  # key of the judging policy among the judge models
PAIR_COLUMNS = ("chosen", "margin", "prompt", "rejected")
SUBSET_COLUMN = "principles"  # the principles that judged a pair, with principles_per_comparison


def pair_columns(stage: LabelPreferencesStage) -> tuple[str, ...]:
    """The columns of the stage's preference rows."""
    extra = (SUBSET_COLUMN,) if stage.principles_per_comparison is not None else ()
    return tuple(sorted(PAIR_COLUMNS + extra))


@dataclass(frozen=True)
class LabelingInputs:
    """Completion rows (``prompt``, ``completion``, what the reward functions read) and the judge models:
    reward-model sources by source name (``rm:<stage>``) and the judging policy under ``"policy"`` (a
    local directory or a hub name, at ``revisions["policy"]``)."""

    rows: list[dict]
    judge_dirs: dict[str, str] = field(default_factory=dict)
    revisions: dict[str, str | None] = field(default_factory=dict)


@dataclass
class Labeling(StageResult):
    """The pairs with what was dropped, the pairs split by the stage's ``splits``, and the completions
    dropped for an invalid score."""

    report: PairingReport
    splits: dict[str, list[dict]]
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "pairs": float(len(self.report.pairs)),
            "invalid_scores": float(len(self.problems)),
            **{f"dropped_{k}": float(v) for k, v in self.report.dropped.items()},
        }


def label_preferences(
    stage: LabelPreferencesStage, inputs: LabelingInputs, env: StageEnvironment
) -> Labeling:
    """Preference pairs from the completion rows, judged by the stage's judge, split by its ``splits``."""
    rows, judge_dirs, stage_name = inputs.rows, inputs.judge_dirs, env.stage
    problems: list[str] = []
    if stage.judge_policy is not None:
        judge = judge_dirs[POLICY_JUDGE], inputs.revisions.get(POLICY_JUDGE)
        report = judge_with_policy(rows, stage, *judge, env)
    elif stage.judge_endpoint is not None:
        report = label_with_endpoint(rows, stage, judge_cache(env.cache_dir), stage_name, seed=env.seed)
    else:
        report, problems = judge_with_rewards(rows, stage, judge_dirs, env.cache_dir, stage_name)
    if not report.pairs:
        raise UserError(f"stage '{stage_name}': no preference pair left (dropped: {dict(report.dropped)})")
    return Labeling(report, split_records(report.pairs, dict(stage.splits), env.seed), problems)


def judge_with_rewards(
    rows: list[dict],
    stage: LabelPreferencesStage,
    judge_dirs: dict[str, str],
    cache_dir: Path,
    stage_name: str,
) -> tuple[PairingReport, list[str]]:
    """Score every completion with the stage's reward sources, then pair by score."""
    scorers = load_reward_model_scorers(judge_dirs, model_source_options(stage.judge))
    scorers |= reward_scorers(stage.judge, cache_dir, stage_name)
    judged, problems = score_completions(rows, stage.judge, scorers, on_invalid="skip", stage=stage_name)
    scored = [{**r, "judge_score": r["reward"]} for r in judged]
    report = label_pairs(
        scored, pairing=stage.pairing, min_margin=stage.min_margin, on_tie=stage.on_tie, stage=stage_name
    )
    return report, problems


def judge_with_policy(
    rows: list[dict],
    stage: LabelPreferencesStage,
    model_dir: str,
    revision: str | None,
    env: StageEnvironment,
) -> PairingReport:
    """Ask the judging policy (greedy, with the engine ``judge_policy.engine`` names) about each candidate
    pair, in both orders, under every principle or a seeded subset (``principles_per_comparison``)."""
    spec = stage.judge_policy
    pairs = candidate_pairs(rows, stage.pairing)
    subsets = principle_subsets(spec.principles, stage.principles_per_comparison, pairs, env.seed)
    with open_policy_judge(spec, model_dir, revision, stage=env.stage, log_dir=env.work_dir) as generate:
        verdicts = judge_pairs(generate, spec.principles, pairs, subsets)
    return pairs_from_verdicts(
        pairs, verdicts, on_tie=stage.on_tie, on_judge_error=spec.on_unparseable, stage=env.stage,
        principles=subsets,
    )  # fmt: skip
