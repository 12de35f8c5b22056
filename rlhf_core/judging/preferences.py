"""Preference pairs from scored completions (book ch.11-12: on-policy preference data, AI feedback).

A judge scores every completion of a prompt (a verifier, a reward model, or a weighted mix: the same
reward sources as the ``sample`` stage); pairs are then formed per prompt:

- ``best_vs_worst``: one pair per prompt, chosen = highest score, rejected = lowest;
- ``all_pairs``: every ordered pair (y_c, y_r) with s(y_c) > s(y_r), C(K,2) pairs at most for K
  distinct completions (the K-completions setting of InstructGPT).

A pair whose score margin is 0 is a tie, one below ``min_margin`` is low-margin; both are dropped and
counted (``on_tie='fail'`` stops at the first tie instead). Identical completion texts never pair.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

from rlhf_core.errors import UserError
from rlhf_core.judging.policy_judge import JudgeParseError


class TiedPreferenceError(UserError):
    """A pair could not be ordered by the judge and ties are configured to fail."""


@dataclass
class PairingReport:
    pairs: list[dict] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


def label_pairs(
    rows: list[dict], *, pairing: str, min_margin: float, on_tie: str, stage: str
) -> PairingReport:
    """Preference rows (prompt, chosen, rejected, margin) from rows with ``prompt`` and ``judge_score``."""
    groups: dict[str, dict[str, float]] = {}
    for row in rows:  # distinct completion texts per prompt, keeping the best score of duplicates
        texts = groups.setdefault(row["prompt"], {})
        texts[row["completion"]] = max(row["judge_score"], texts.get(row["completion"], float("-inf")))
    report = PairingReport()
    for prompt, scored in groups.items():
        ranked = sorted(scored.items(), key=lambda item: -item[1])  # stable: first seen wins ties
        if len(ranked) < 2:
            report.dropped["single_completion"] += 1
            continue
        candidates = (
            [(ranked[0], ranked[-1])] if pairing == "best_vs_worst" else list(combinations(ranked, 2))
        )
        for (chosen, s_c), (rejected, s_r) in candidates:
            margin = s_c - s_r
            if margin == 0:
                if on_tie == "fail":
                    raise TiedPreferenceError(
                        f"stage '{stage}': the judge scored two completions of prompt "
                        f"{prompt!r} equally ({s_c:g}); set on_tie: skip to drop ties"
                    )
                report.dropped["tie"] += 1
            elif margin < min_margin:
                report.dropped["low_margin"] += 1
            else:
                report.pairs.append(
                    {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin}
                )
    return report


def candidate_pairs(rows: list[dict], pairing: str) -> list[tuple[str, str, str]]:
    """(prompt, first, second) pairs of distinct completions for a pairwise judge.

    ``best_vs_worst`` has no scores to rank by here, so it pairs each prompt's first two distinct
    completions; ``all_pairs`` pairs every two distinct completions.
    """
    groups: dict[str, list[str]] = {}
    for row in rows:
        texts = groups.setdefault(row["prompt"], [])
        if row["completion"] not in texts:
            texts.append(row["completion"])
    pairs = []
    for prompt, texts in groups.items():
        chosen = (
            list(combinations(texts, 2)) if pairing == "all_pairs" else [tuple(texts[:2])] * (len(texts) > 1)
        )
        pairs += [(prompt, a, b) for a, b in chosen]
    return pairs


def pairs_from_verdicts(
    pairs: list[tuple[str, str, str]],
    verdicts: list,
    *,
    on_tie: str,
    on_judge_error: str,
    stage: str,
    principles: Sequence[Sequence[str]] | None = None,
) -> PairingReport:
    """Preference rows from pairwise verdicts ('first', 'second', 'tie' or an exception); with
    ``principles`` (the subset that judged each pair), each row records its subset in ``principles``."""
    report = PairingReport()
    for i, ((prompt, first, second), verdict) in enumerate(zip(pairs, verdicts, strict=True)):
        if isinstance(verdict, Exception):
            if on_judge_error == "fail":
                raise JudgeParseError(f"stage '{stage}': prompt {prompt!r}: {verdict}") from verdict
            report.dropped["judge_unparseable"] += 1
        elif verdict == "tie":
            if on_tie == "fail":
                raise TiedPreferenceError(f"stage '{stage}': the judge found no winner for prompt {prompt!r}")
            report.dropped["tie"] += 1
        else:
            chosen, rejected = (first, second) if verdict == "first" else (second, first)
            row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": 1.0}
            report.pairs.append(row if principles is None else {**row, "principles": list(principles[i])})
    return report
