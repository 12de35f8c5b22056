"""Endpoint judges declared in a spec (:class:`~rlhf_core.spec.endpoints.EndpointJudgeSpec`), run for
the stages that use them (LLM-as-a-judge, book ch.12):

- :func:`label_with_endpoint`: ``label_preferences`` with ``judge_endpoint``: pairwise verdicts in both
  orders (like the policy judge), or pointwise scores paired by the stage's ``pairing`` rules;
- :func:`endpoint_win_verdicts`: an ``evaluate`` win-rate judge: the candidate's answer against the
  baseline's, pairwise or by the higher pointwise score;
- :func:`endpoint_scorer` / :func:`reward_scorers`: an endpoint as a reward source, scoring
  (prompt, completion) pairs in [0, 1] for :func:`rlhf_core.rewards.composite.score_completions`.

Every answer is kept in the home's verdict cache (``<home>/cache/judge``, :func:`judge_cache`): a
re-run (after a crash, or forced) asks the endpoint nothing it asked before, wherever it is served.
An answer without a verdict or score is left out and counted (``on_unparseable: skip``) or stops the
stage naming its row (``fail``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from rlhf_core.judging.endpoint_client import EndpointClient, EndpointSettings
from rlhf_core.judging.endpoint_judge import (
    ScoreScale,
    cached_generate,
    score_on_endpoint,
    split_unparseable,
)
from rlhf_core.judging.policy_judge import judge_pairs, principle_subsets
from rlhf_core.judging.preferences import PairingReport, candidate_pairs, label_pairs, pairs_from_verdicts
from rlhf_core.judging.rubric_judges import rubric_scorers
from rlhf_core.judging.verdict_cache import VerdictCache
from rlhf_core.spec.endpoints import EndpointJudgeSpec
from rlhf_core.spec.stages.sampling import LabelPreferencesStage

JUDGE_CACHE = "judge"  # <home>/cache/judge
ScoreFn = Callable[[list[tuple[str, str]]], list[float]]  # (prompt, completion) pairs -> scores


def judge_cache(cache_dir: Path) -> VerdictCache:
    """The verdict cache shared by every stage and run of a home (``cache_dir`` is ``<home>/cache``)."""
    return VerdictCache(Path(cache_dir) / JUDGE_CACHE)


def endpoint_client(spec: EndpointJudgeSpec) -> EndpointClient:
    """A client for the declared endpoint; greedy answers, so a cached verdict is the verdict."""
    settings = EndpointSettings(
        base_url=spec.base_url,
        model=spec.model,
        api_key_env=spec.api_key_env,
        timeout_s=spec.timeout_s,
        max_concurrency=spec.max_concurrency,
        max_retries=spec.max_retries,
        max_tokens=spec.max_tokens,
    )
    return EndpointClient(settings)


def scale_of(spec: EndpointJudgeSpec) -> ScoreScale:
    return ScoreScale(spec.scale.low, spec.scale.high)


def label_with_endpoint(
    rows: list[dict], stage: LabelPreferencesStage, cache: VerdictCache, stage_name: str, seed: int = 0
) -> PairingReport:
    """Preference pairs from completion rows (``prompt``, ``completion``), judged by the stage's
    ``judge_endpoint``: pairwise verdicts (under every principle, or a subset drawn per pair from
    ``seed``: ``principles_per_comparison``), or pointwise scores ranked by ``pairing``."""
    spec = stage.judge_endpoint
    assert spec is not None
    client, what = endpoint_client(spec), f"stage '{stage_name}', judge '{spec.judge_name}'"
    if spec.mode == "pairwise":
        pairs = candidate_pairs(rows, stage.pairing)
        principles = spec.principles or ()
        subsets = principle_subsets(principles, stage.principles_per_comparison, pairs, seed)
        verdicts = judge_pairs(cached_generate(client, cache), principles, pairs, subsets)
        return pairs_from_verdicts(
            pairs, verdicts, on_tie=stage.on_tie, on_judge_error=spec.on_unparseable, stage=stage_name,
            principles=subsets,
        )  # fmt: skip
    items = [(row["prompt"], row["completion"]) for row in rows]
    scores = score_on_endpoint(client, cache, spec.rubric or "", items, scale_of(spec))
    parsed, unparseable = split_unparseable(scores, on_unparseable=spec.on_unparseable, what=what)
    scored = [{**row, "judge_score": parsed[i]} for i, row in enumerate(rows) if i in parsed]
    report = label_pairs(
        scored, pairing=stage.pairing, min_margin=stage.min_margin, on_tie=stage.on_tie, stage=stage_name
    )
    if unparseable:
        report.dropped["judge_unparseable"] += unparseable
    return report


def endpoint_scorer(spec: EndpointJudgeSpec, cache: VerdictCache, what: str) -> ScoreFn:
    """Pointwise scores in [0, 1] per (prompt, completion); an unparseable answer scores NaN (``skip``:
    the stage's rule for an invalid reward then drops or stops on it) or stops here (``fail``)."""
    client, scale = endpoint_client(spec), scale_of(spec)

    def score(pairs: list[tuple[str, str]]) -> list[float]:
        results = score_on_endpoint(client, cache, spec.rubric or "", pairs, scale)
        parsed, _ = split_unparseable(results, on_unparseable=spec.on_unparseable, what=what)
        return [float(parsed[i]) if i in parsed else math.nan for i in range(len(results))]  # type: ignore[arg-type]

    return score


def reward_scorers(sources: Sequence, cache_dir: Path, stage_name: str) -> dict[str, ScoreFn]:
    """A scorer per endpoint judge and per rubric among the reward ``sources`` (by source name), for
    ``score_completions``' ``model_scorers`` beside the reward models; verdicts cached under
    ``cache_dir/judge``. A rubric scorer also takes the rows (its items are in a prompt column)."""
    endpoints = [s for s in sources if getattr(s, "endpoint", None) is not None]
    rubrics = [s for s in sources if getattr(s, "rubric", None) is not None]
    if not endpoints and not rubrics:
        return {}
    cache = judge_cache(cache_dir)
    scorers: dict = {
        s.name: endpoint_scorer(s.endpoint, cache, f"stage '{stage_name}', reward source '{s.name}'")
        for s in endpoints
    }
    return scorers | rubric_scorers(rubrics, cache, stage_name)


def endpoint_win_verdicts(
    spec: EndpointJudgeSpec,
    cache: VerdictCache,
    questions: Sequence[str],
    candidate: Sequence[str],
    baseline: Sequence[str],
    tie_margin: float = 0.0,
) -> list[str | Exception]:
    """'win', 'loss' or 'tie' of the candidate's answer per question, or the parse error in its place.

    Identical answers tie without asking. Pairwise: both orders, the candidate first, then second;
    they must agree. Pointwise: each answer scored alone; |s_c - s_b| <= ``tie_margin`` ties.
    """
    client = endpoint_client(spec)
    asked = [i for i, (c, b) in enumerate(zip(candidate, baseline, strict=True)) if c != b]
    verdicts: list[str | Exception] = ["tie"] * len(candidate)
    if not asked:
        return verdicts
    if spec.mode == "pairwise":
        pairs = [(questions[i], candidate[i], baseline[i]) for i in asked]
        named = {"first": "win", "second": "loss", "tie": "tie"}
        answers = judge_pairs(cached_generate(client, cache), spec.principles or (), pairs)
        for i, verdict in zip(asked, answers, strict=True):
            verdicts[i] = verdict if isinstance(verdict, Exception) else named[verdict]
        return verdicts
    items = [(questions[i], candidate[i]) for i in asked] + [(questions[i], baseline[i]) for i in asked]
    scores = score_on_endpoint(client, cache, spec.rubric or "", items, scale_of(spec))
    for k, i in enumerate(asked):
        s_c, s_b = scores[k], scores[len(asked) + k]
        if isinstance(s_c, Exception) or isinstance(s_b, Exception):
            verdicts[i] = s_c if isinstance(s_c, Exception) else s_b  # type: ignore[assignment]
        else:
            verdicts[i] = "tie" if abs(s_c - s_b) <= tie_margin else ("win" if s_c > s_b else "loss")
    return verdicts
