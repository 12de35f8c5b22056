"""Best-of-N evaluation (book ch.9, rejection sampling at inference time).

For each prompt x_i draw N completions y_i1..y_iN from the policy, score them with the reward sources,
and answer with the top one, y_i,S(R)_i with S(R)_i = argmax_j r_ij (the same rule as rejection
sampling's "top per prompt"). Checked by a verifier, three accuracies tell how much a reward signal is
worth as a selector:

- ``pass_at_1``: the mean correctness over all N samples, i.e. the expected accuracy of answering with
  one random sample (what the policy does alone at this temperature);
- ``best_of_n``: the correctness of the selected completion;
- ``pass_at_n``: the share of prompts with at least one correct sample, the ceiling of any selector.

A reward model that orders answers well lifts ``best_of_n`` from ``pass_at_1`` towards ``pass_at_n``;
one at chance leaves it near ``pass_at_1``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from rlhf_core.selection.rejection_sampling import select_completions


@dataclass
class BestOfNReport:
    prompts: int
    samples: int
    best_of_n: float
    pass_at_1: float
    pass_at_n: float
    selected_reward_mean: float
    selected: list[dict]  # the chosen row of each prompt, with its verdict under "correct"

    def metrics(self, prefix: str = "eval/best_of_n") -> dict[str, float]:
        return {
            f"{prefix}/accuracy": self.best_of_n,
            f"{prefix}/pass_at_1": self.pass_at_1,
            f"{prefix}/pass_at_n": self.pass_at_n,
            f"{prefix}/selected_reward_mean": self.selected_reward_mean,
            f"{prefix}/prompts": float(self.prompts),
        }


def best_of_n(rows: list[dict], is_correct: Callable[[dict], bool]) -> BestOfNReport:
    """Pick the highest-reward completion per prompt and check every completion with ``is_correct``.

    ``rows`` are scored completion rows (``prompt_index``, ``completion_index``, ``reward`` and what
    ``is_correct`` reads). Ties go to the lower ``completion_index``, as in rejection sampling.
    """
    if not rows:
        raise ValueError("best_of_n needs at least one scored completion")
    correct_by_prompt: dict[int, list[bool]] = {}
    for row in rows:
        correct_by_prompt.setdefault(row["prompt_index"], []).append(bool(is_correct(row)))
    selected = [
        {**row, "correct": bool(is_correct(row))} for row in select_completions(rows, "top_per_prompt")
    ]
    return BestOfNReport(
        prompts=len(selected),
        samples=len(rows),
        best_of_n=statistics.fmean(r["correct"] for r in selected),
        pass_at_1=statistics.fmean(statistics.fmean(v) for v in correct_by_prompt.values()),
        pass_at_n=statistics.fmean(any(v) for v in correct_by_prompt.values()),
        selected_reward_mean=statistics.fmean(r["reward"] for r in selected),
        selected=selected,
    )
