"""LLM judges served behind an OpenAI-compatible endpoint: pairwise verdicts and pointwise scores
(LLM-as-a-judge, book ch.12; the rubric-as-prompt idea of constitutional AI, book ch.13).

- Pairwise: :func:`judge_pairs_on_endpoint` asks policy_judge's own prompt in both orders and parses
  its ``[[A]]``/``[[B]]``/``[[C]]`` verdicts, so a served judge and a local policy judge agree on method.
- Pointwise: :func:`score_on_endpoint` gives the rubric as the system turn and asks for a score on a
  declared scale, ending in ``[[score: N]]`` (the MT-Bench single-answer form); the score is normalised
  to [0, 1]. A missing or out-of-scale score is returned as a :class:`JudgeParseError` in its place,
  which the caller counts and skips or fails on (:func:`split_unparseable`).

Every answer goes through a :class:`VerdictCache`, so a re-run sends no request it has sent before.
:func:`judge_digest` identifies a judge declaration for stage fingerprints: model, principles or
rubric, scale and prompt-template version, never the URL or the key.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rlhf_core.errors import UserError
from rlhf_core.judging.endpoint_client import EndpointClient, EndpointSettings
from rlhf_core.judging.policy_judge import GenerateFn, JudgeParseError, judge_pairs
from rlhf_core.judging.verdict_cache import VerdictCache

# The prompt versions live with the spec, whose stage configs record the version that ran: bump one when
# policy_judge.judge_prompt (pairwise) or score_prompt below (pointwise) is reworded.
from rlhf_core.spec.endpoints import PAIRWISE_TEMPLATE_VERSION, POINTWISE_TEMPLATE_VERSION, ChatEndpointSpec

STORE_EVERY = 256  # prompts sent between two writes to the verdict cache
SCORE = re.compile(r"\[\[\s*score\s*:\s*(-?\d+(?:\.\d+)?)\s*\]\]", re.IGNORECASE)


@dataclass(frozen=True)
class ScoreScale:
    """The closed range a pointwise judge scores on; ``low`` maps to 0 and ``high`` to 1."""

    low: int = 1
    high: int = 10

    def __post_init__(self) -> None:
        if self.high <= self.low:
            raise UserError(f"score scale: high ({self.high}) must be above low ({self.low})")

    def normalise(self, score: float) -> float:
        return (score - self.low) / (self.high - self.low)


def cached_generate(client: EndpointClient, cache: VerdictCache, system: str | None = None) -> GenerateFn:
    """A ``generate(prompts) -> outputs`` over the endpoint that asks only what the cache lacks."""
    identity = judge_identity(client)

    def generate(prompts: list[str]) -> list[str]:
        outputs = cache.lookup(identity, system, prompts)
        missing = list(dict.fromkeys(p for p, out in zip(prompts, outputs, strict=True) if out is None))
        answers: dict[str, str] = {}
        for start in range(0, len(missing), STORE_EVERY):  # stored as they come: a failure keeps the rest
            batch = missing[start : start + STORE_EVERY]
            batch_answers = client.complete(batch, system=system)
            cache.store(identity, system, batch, batch_answers)
            answers.update(zip(batch, batch_answers, strict=True))
        return [answers[p] if out is None else out for p, out in zip(prompts, outputs, strict=True)]

    return generate


def chat_endpoint_generate(spec: ChatEndpointSpec, cache: VerdictCache) -> GenerateFn:
    """A greedy ``prompts -> answers`` function over a declared chat endpoint (a critic, a rubric judge)
    that asks only what ``cache`` lacks."""
    settings = EndpointSettings(
        base_url=spec.base_url, model=spec.model, api_key_env=spec.api_key_env, timeout_s=spec.timeout_s,
        max_concurrency=spec.max_concurrency, max_retries=spec.max_retries, max_tokens=spec.max_tokens,
    )  # fmt: skip
    return cached_generate(EndpointClient(settings), cache)


def judge_identity(client: EndpointClient) -> str:
    """What makes two endpoints' answers interchangeable: the model and its generation settings."""
    s = client.settings
    return json.dumps({"model": s.model, "temperature": s.temperature, "max_tokens": s.max_tokens})


def judge_pairs_on_endpoint(
    client: EndpointClient,
    cache: VerdictCache,
    principles: Sequence[str],
    pairs: list[tuple[str, str, str]],
) -> list[str | Exception]:
    """'first', 'second', 'tie' or the parse error per (question, first, second); both orders asked."""
    return judge_pairs(cached_generate(client, cache), principles, pairs)


def score_prompt(question: str, response: str, scale: ScoreScale) -> str:
    """The user turn of a pointwise judgement; the rubric travels as the system turn."""
    return (
        "Rate the response to the user's question by the rubric you were given.\n\n"
        f"[Question]\n{question}\n\n[Response]\n{response}\n\n"
        f"Explain briefly, then end with your score from {scale.low} (worst) to {scale.high} (best) "
        f"in exactly this form: [[score: N]]"
    )


def rubric_system_text(rubric: str) -> str:
    return f"You are an impartial judge. Score responses by this rubric:\n{rubric}"


def parse_score(output: str, scale: ScoreScale) -> float:
    """The last ``[[score: N]]`` in the output, normalised to [0, 1]; JudgeParseError when there is none
    or it lies outside the scale."""
    found = SCORE.findall(output)
    if not found:
        raise JudgeParseError(f"no [[score: N]] verdict in judge output {output[:120]!r}")
    score = float(found[-1])
    if not scale.low <= score <= scale.high:
        raise JudgeParseError(
            f"judge score {score:g} is outside the scale {scale.low}-{scale.high} in {output[:120]!r}"
        )
    return scale.normalise(score)


def score_on_endpoint(
    client: EndpointClient,
    cache: VerdictCache,
    rubric: str,
    items: list[tuple[str, str]],
    scale: ScoreScale = ScoreScale(),
) -> list[float | JudgeParseError]:
    """A score in [0, 1] per (question, response), or the parse error in its place."""
    generate = cached_generate(client, cache, system=rubric_system_text(rubric))
    outputs = generate([score_prompt(q, r, scale) for q, r in items])
    results: list[float | JudgeParseError] = []
    for output in outputs:
        try:
            results.append(parse_score(output, scale))
        except JudgeParseError as exc:
            results.append(exc)
    return results


def split_unparseable(
    results: Sequence[object], *, on_unparseable: Literal["skip", "fail"], what: str
) -> tuple[dict[int, object], int]:
    """The parsed results by index and the count of unparseable ones; with ``'fail'``, the first
    unparseable one raises, naming ``what`` (e.g. "stage 'label', judge 'helpful'") and its row."""
    failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
    if failed and on_unparseable == "fail":
        raise JudgeParseError(
            f"{what}: {len(failed)} of {len(results)} judge answer(s) unparseable, first at row {failed[0]}: "
            f"{results[failed[0]]}; set on_unparseable: skip to leave them out"
        ) from results[failed[0]]  # type: ignore[misc]
    return {i: r for i, r in enumerate(results) if not isinstance(r, Exception)}, len(failed)


def judge_digest(
    model: str,
    *,
    principles: Sequence[str] | None = None,
    rubric: str | None = None,
    scale: ScoreScale | None = None,
) -> str:
    """sha256 of a judge declaration: pairwise (``principles``) or pointwise (``rubric`` and ``scale``).

    Endpoint URL and API key are left out on purpose: where a model is served does not change it.
    """
    if (principles is None) == (rubric is None):
        raise UserError("judge_digest: give either principles (pairwise) or a rubric (pointwise)")
    if principles is not None:
        declaration = {
            "kind": "pairwise",
            "template": PAIRWISE_TEMPLATE_VERSION,
            "principles": list(principles),
        }
    else:
        scale = scale or ScoreScale()
        declaration = {
            "kind": "pointwise",
            "template": POINTWISE_TEMPLATE_VERSION,
            "rubric": rubric,
            "scale": [scale.low, scale.high],
        }
    return hashlib.sha256(json.dumps({"model": model, **declaration}, sort_keys=True).encode()).hexdigest()
