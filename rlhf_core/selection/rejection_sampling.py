"""Rejection-sampling selection (book ch.9).

Prompts x_1..x_M, N completions each, rewards R in R^{M x N} with r_ij = reward(y_ij | x_i).

- Top per prompt: S(R) = [argmax_j r_1j, ..., argmax_j r_Mj]; keep y_{i, S(R)_i}.
- Top-K overall: flatten R row-major to R_flat (length M*N) and keep the K largest; flat index k maps
  back to prompt i = k // N and completion j = k % N (0-based here).

Ties: a stable descending sort, so among equal rewards the earlier (lower flat index) wins. This is the
convention that reproduces the book's worked example order [8, 5, 14, 0, 11].

The ``rejection_sampling`` stage's work is :func:`select_sft_records` (``run(stage, inputs, env)``); it
reads the stage through :class:`SelectionSettings` (the spec's ``RejectionSamplingStage`` is one).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rlhf_core.errors import UserError
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.stage_results import StageResult


class SelectionSettings(Protocol):
    """What the ``rejection_sampling`` stage's work reads of the stage."""

    @property
    def strategy(self) -> str: ...  # 'top_per_prompt' or 'top_k_overall'
    @property
    def k(self) -> int | None: ...
    @property
    def min_reward(self) -> float | None: ...


@dataclass(frozen=True)
class SelectionInputs:
    """The scored completion rows (``prompt_index``, ``completion_index``, ``reward``, ...)."""

    rows: list[dict]


@dataclass
class Selection(StageResult):
    """The selected completions as SFT rows, and the numbers that describe the selection."""

    records: list[dict]
    figures: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        return dict(self.figures)


def top_per_prompt(rewards: Sequence[Sequence[float]]) -> list[int]:
    """Index of the best completion of each prompt (first one on ties)."""
    return [max(range(len(row)), key=lambda j, row=row: (row[j], -j)) for row in rewards]


def top_k_overall_flat(rewards: Sequence[Sequence[float]], k: int) -> list[int]:
    """Flat row-major indices of the K highest rewards, best first (stable on ties)."""
    flat = [r for row in rewards for r in row]
    if not 0 < k <= len(flat):
        raise ValueError(f"k must be in 1..{len(flat)} (M*N), got {k}")
    order = sorted(range(len(flat)), key=lambda i: -flat[i])  # sorted() is stable
    return order[:k]


def top_k_overall(rewards: Sequence[Sequence[float]], k: int) -> list[tuple[int, int]]:
    """(prompt index, completion index) pairs of the K highest rewards, best first."""
    n = len(rewards[0])
    if any(len(row) != n for row in rewards):
        raise ValueError("every prompt needs the same number of completions N for top-K overall")
    return [divmod(i, n) for i in top_k_overall_flat(rewards, k)]


def select_completions(
    rows: list[dict], strategy: str, k: int | None = None, min_reward: float | None = None
) -> list[dict]:
    """Apply the selection rule to scored rows (``prompt_index``, ``completion_index``, ``reward``).

    Rows may be ragged (a prompt with fewer completions after invalid rewards were skipped).
    """
    ordered = sorted(rows, key=lambda r: (r["prompt_index"], r["completion_index"]))
    if strategy == "top_per_prompt":
        groups: dict[int, list[dict]] = {}
        for row in ordered:
            groups.setdefault(row["prompt_index"], []).append(row)
        picked = [
            group[j]
            for group, j in zip(
                groups.values(),
                top_per_prompt([[r["reward"] for r in g] for g in groups.values()]),
                strict=True,
            )
        ]
    elif strategy == "top_k_overall":
        if k is None:
            raise ValueError("top_k_overall needs k")
        flat = [[r["reward"] for r in ordered]]  # one row: the same stable order as the book's R_flat
        picked = [ordered[i] for i in top_k_overall_flat(flat, min(k, len(ordered)))]
    else:
        raise ValueError(f"unknown selection strategy {strategy!r}")
    return [r for r in picked if min_reward is None or r["reward"] >= min_reward]


def to_sft_records(selected: list[dict]) -> list[dict]:
    """Selected completions as SFT conversations (the prompt as user turn, the completion as reply); a
    selected episode of an environment (book ch.13) is its whole conversation, tool calls and results
    included, with the tools it was given (only its assistant turns are trained)."""
    return [_sft_record(r) for r in selected]


def _sft_record(row: dict) -> dict:
    if isinstance(row.get("messages"), list) and "outcome" in row:  # an episode's row
        tools = {"tools": row["tools"]} if row.get("tools") else {}
        return {"messages": row["messages"], **tools, "reward": row["reward"]}
    reply = {"role": "assistant", "content": row["completion"]}
    return {"messages": [{"role": "user", "content": row["prompt"]}, reply], "reward": row["reward"]}


def select_sft_records(stage: SelectionSettings, inputs: SelectionInputs, env: StageEnvironment) -> Selection:
    """The ``rejection_sampling`` stage's work: the completions ``stage.strategy`` selects (see
    :func:`select_completions`) as SFT rows, and the numbers that describe the selection (selected,
    candidates, mean reward of the selection and of all rows)."""
    rows, min_reward = inputs.rows, stage.min_reward
    picked = select_completions(rows, stage.strategy, k=stage.k, min_reward=min_reward)
    if not picked:
        raise UserError(f"stage '{env.stage}': the selection kept no completion (min_reward {min_reward})")
    figures = {
        "selected": float(len(picked)),
        "candidates": float(len(rows)),
        "selected_reward_mean": statistics.fmean(r["reward"] for r in picked),
        "all_reward_mean": statistics.fmean(r["reward"] for r in rows),
    }
    return Selection(to_sft_records(picked), figures)
