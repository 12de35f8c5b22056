"""Pairwise win rate of a candidate against the baseline, per judge (book ch.16: A/B comparisons,
LLM-as-a-judge; ch.5 and ch.12: reward models and rubric judges).

Both models answer the same held-out prompts; for each prompt a judge compares the candidate's answer
with the baseline's and gives a verdict: ``win``, ``loss`` or ``tie``.

- a reward source (reward model or reward function): the higher score wins; scores within the
  judge's ``tie_margin`` of each other (|s_c - s_b| <= margin) tie;
- the verifier: a correct answer beats a wrong one; both right or both wrong tie;
- a policy judging against a rubric (principles): asked in both orders (position bias), it must name
  the same answer both times to decide; disagreement, or [[C]], is a tie
  (:mod:`rlhf_core.judging.policy_judge`). A verdict it does not state is dropped and counted, or
  stops the stage (``on_unparseable``).

Identical answers tie under every judge (a policy judge is not asked about them).

Figures (ties count half a win, so 0.5 is parity: a model against itself scores exactly 0.5)::

    eval/win_rate/<judge> = (wins + ties / 2) / comparisons
    eval/tie_rate/<judge> = ties / comparisons

with comparisons the prompts judged; wins alone are ``win_rate - tie_rate / 2``. Each interval is the
percentile bootstrap over prompts (per-prompt scores 1 / 0.5 / 0, and 1 / 0 for the tie rate).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from rlhf_core.evaluation.statistics import figure_with_interval
from rlhf_core.judging.policy_judge import JudgeParseError, judge_pairs

Verdict = Literal["win", "loss", "tie"]
SCORE: dict[str, float] = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def reward_verdicts(
    candidate: Sequence[float], baseline: Sequence[float], tie_margin: float = 0.0
) -> list[Verdict]:
    """Higher score wins; |s_c - s_b| <= ``tie_margin`` is a tie."""
    verdicts: list[Verdict] = []
    for s_c, s_b in zip(candidate, baseline, strict=True):
        verdicts.append("tie" if abs(s_c - s_b) <= tie_margin else ("win" if s_c > s_b else "loss"))
    return verdicts


def verifier_verdicts(candidate: Sequence[bool], baseline: Sequence[bool]) -> list[Verdict]:
    """Correct beats incorrect; both correct or both incorrect tie."""
    return [
        "tie" if bool(c) == bool(b) else ("win" if c else "loss")
        for c, b in zip(candidate, baseline, strict=True)
    ]


def policy_verdicts(
    generate: Callable[[list[str]], list[str]],
    principles: Sequence[str],
    prompts: Sequence[Any],
    candidate: Sequence[str],
    baseline: Sequence[str],
) -> list[Verdict | Exception]:
    """A policy judge's verdict per prompt, asked in both orders (the candidate first, then second);
    a verdict it does not state is returned as the parse error."""
    asked = [i for i, (c, b) in enumerate(zip(candidate, baseline, strict=True)) if c != b]
    pairs = [(question_text(prompts[i]), candidate[i], baseline[i]) for i in asked]
    verdicts: list[Verdict | Exception] = ["tie"] * len(candidate)
    named = {"first": "win", "second": "loss", "tie": "tie"}
    for i, verdict in zip(asked, judge_pairs(generate, principles, pairs) if pairs else [], strict=True):
        verdicts[i] = verdict if isinstance(verdict, Exception) else named[verdict]  # type: ignore[assignment]
    return verdicts


def question_text(prompt: Any) -> str:
    """A prompt as the judge reads it: its text, or a conversation's turns as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{turn['role']}: {turn['content']}" for turn in prompt)


def win_rate_metrics(
    judge: str,
    verdicts: Sequence[Verdict | Exception],
    seed: int,
    *,
    on_unparseable: Literal["skip", "fail"] = "skip",
    stage: str = "evaluate",
    prompts: Sequence[Any] = (),
) -> dict[str, float]:
    """``eval/win_rate/<judge>`` and ``eval/tie_rate/<judge>`` with intervals over the prompts judged.

    Unparseable policy verdicts are counted (``eval/judge_unparseable/<judge>``) and left out, or stop
    the stage with ``on_unparseable='fail'``.
    """
    failed = [i for i, v in enumerate(verdicts) if isinstance(v, Exception)]
    if failed and on_unparseable == "fail":
        where = f" (prompt {question_text(prompts[failed[0]])!r})" if prompts else ""
        raise JudgeParseError(
            f"stage '{stage}', win_rate judge '{judge}': {len(failed)} verdict(s) without [[A]]/[[B]]/[[C]]"
            f"{where}: {verdicts[failed[0]]}; set on_unparseable: skip to leave them out"
        )
    judged = [v for v in verdicts if not isinstance(v, Exception)]
    metrics: dict[str, float] = {}
    if failed or judge.startswith(("policy:", "endpoint:")):
        metrics[f"eval/judge_unparseable/{judge}"] = float(len(failed))
    if not judged:
        return metrics | {f"eval/win_rate/{judge}_n": 0.0, f"eval/tie_rate/{judge}_n": 0.0}
    metrics |= figure_with_interval(f"eval/win_rate/{judge}", [SCORE[v] for v in judged], seed)
    metrics |= figure_with_interval(f"eval/tie_rate/{judge}", [float(v == "tie") for v in judged], seed)
    return metrics
