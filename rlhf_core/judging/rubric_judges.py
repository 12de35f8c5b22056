"""Rubric reward sources run for a stage (book ch.12, "Rubrics"): the declared judge endpoint asked about
each rubric item, its answers kept in the home's verdict cache (``<home>/cache/judge``), so a re-run asks
nothing it asked before. The formula and the item format are :mod:`rlhf_core.rewards.rubrics`'.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhf_core.judging.endpoint_judge import chat_endpoint_generate
from rlhf_core.judging.policy_judge import GenerateFn
from rlhf_core.judging.verdict_cache import VerdictCache
from rlhf_core.rewards.rubrics import RubricScorer, score_rubrics
from rlhf_core.spec.rubrics import RubricSpec


def rubric_scorer(spec: RubricSpec, judge: GenerateFn, what: str) -> RubricScorer:
    """Rubric rewards of (prompt, completion) pairs, the items read from each pair's row."""

    def score(pairs: list[tuple[str, str]], rows: list[dict]) -> list[float]:
        return score_rubrics(
            pairs, rows, judge, column=spec.column, category_weights=spec.weights, clip=spec.clip,
            on_unparseable=spec.on_unparseable, what=what,
        )  # fmt: skip

    return score


def rubric_scorers(sources: Sequence, cache: VerdictCache, stage_name: str) -> dict[str, RubricScorer]:
    """A scorer per rubric source among the reward ``sources`` (by source name), its judge's answers in
    ``cache``."""
    return {
        s.name: rubric_scorer(
            s.rubric,
            chat_endpoint_generate(s.rubric.judge, cache),
            f"stage '{stage_name}', reward source '{s.name}'",
        )
        for s in sources
        if getattr(s, "rubric", None) is not None
    }


def policy_rubric_judge(model, tokenizer, max_new_tokens: int = 64) -> GenerateFn:  # noqa: ANN001
    """A policy model as the rubric judge: greedy answers to the item prompts (native decoding loop)."""
    from rlhf_core.rollout.generation import generate_completions  # torch only when a policy judges

    def generate(prompts: list[str]) -> list[str]:
        return generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0)

    return generate
