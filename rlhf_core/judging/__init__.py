"""Judging completions into preference pairs and rewards, and revising them (AI feedback, book ch.12).

- :mod:`~rlhf_core.judging.preferences`: pairs from scored completions or from pairwise verdicts;
- :mod:`~rlhf_core.judging.policy_judge`: a policy model as pairwise judge (both orders must agree);
- :mod:`~rlhf_core.judging.labeling`: the ``label_preferences`` stage's work, models loaded included
  (imports torch, so it is not re-exported here); ``principles_per_comparison`` gives a pairwise judge a
  seeded subset of the principles per pair (Constitutional AI's feedback step);
- :mod:`~rlhf_core.judging.constitutional`: the ``constitutional_revision`` stage (critique and revise
  under sampled principles, Constitutional AI's supervised part);
- :mod:`~rlhf_core.judging.rubric_judges`: rubric reward sources, their items checked by a judge.
"""

from rlhf_core.judging.policy_judge import JudgeParseError, judge_pairs, judge_prompt, parse_verdict
from rlhf_core.judging.preferences import (
    PairingReport,
    TiedPreferenceError,
    candidate_pairs,
    label_pairs,
    pairs_from_verdicts,
)

__all__ = [
    "JudgeParseError",
    "PairingReport",
    "TiedPreferenceError",
    "candidate_pairs",
    "judge_pairs",
    "judge_prompt",
    "label_pairs",
    "pairs_from_verdicts",
    "parse_verdict",
]
