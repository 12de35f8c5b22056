"""pass@k of a model on verifiable prompts, from n samples per prompt (book ch.16, Chen et al. 2021).

For each prompt, n completions are sampled and c of them verified correct; the unbiased estimate of
the chance that at least one of k samples is correct is 1 - C(n-c, k) / C(n, k)
(:func:`~rlhf_core.evaluation.statistics.pass_at_k`), and pass@k is its mean over prompts. Its
interval is the percentile bootstrap over prompts of these per-prompt estimates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.evaluation.statistics import figure_with_interval, pass_at_k
from rlhf_core.rollout.engines.base import RolloutEngine
from rlhf_core.rollout.sampling import sample_completions
from rlhf_core.spec.stages.evaluation import PassAtKSpec


def pass_at_k_metrics(correct: Sequence[Sequence[bool]], ks: Sequence[int], seed: int) -> dict[str, float]:
    """``eval/pass_at_<k>`` (+ interval over prompts, ``_n`` = prompts) from per-prompt verdicts of
    n samples each (``correct[i][j]``: sample j of prompt i is correct)."""
    metrics: dict[str, float] = {}
    for k in sorted(set(ks)):
        per_prompt = [pass_at_k(len(samples), sum(map(bool, samples)), k) for samples in correct]
        metrics |= figure_with_interval(f"eval/pass_at_{k}", per_prompt, seed)
    return metrics


def sample_and_verify(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_rows: list[dict],
    spec: PassAtKSpec,
    verifier: Callable[[str, dict], float],
    seed: int,
    engine: str | RolloutEngine | None = None,
) -> list[list[bool]]:
    """``spec.n`` samples per prompt row, each checked by the verifier (1.0 = correct). ``engine``: an
    open rollout engine holding the model's weights (default: the loop ``spec.generation`` names)."""
    rows, _, _ = sample_completions(
        model, tokenizer, prompt_rows, spec.n, spec.generation, seed, engine=engine
    )
    correct: list[list[bool]] = [[] for _ in prompt_rows]
    for row in rows:
        correct[row["prompt_index"]].append(
            verifier(row["completion"], prompt_rows[row["prompt_index"]]) == 1.0
        )
    return correct
