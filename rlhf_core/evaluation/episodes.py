"""Evaluating a model in an environment (book ch.13): task success, pass@k and pass^k over episodes, and
how it used its tools.

- task success (``eval/accuracy``): one episode per prompt (the stage's ``generation`` settings), its final
  answer checked by the stage's verifier;
- ``eval/episode/...``: turns per episode, the share of each outcome (done, turn_limit, length,
  context_limit) and the mean per episode of every count the environment reports (``tool_calls``,
  ``invalid_tool_calls``, ...), and ``eval/tool_call_validity``: valid calls / calls made, over all
  episodes (only when calls were made);
- ``eval/tool_call_match``: where prompt rows carry gold calls (column ``gold_tool_calls``: a list of
  ``{"name", "arguments"}``), the share of episodes whose calls, in order, are exactly those (name and
  arguments);
- pass@k (at least one of k trials succeeds) and the book's **pass^k** (all k trials succeed,
  tau-bench's consistency): from n episodes per prompt, unbiased per prompt as C(c, k) / C(n, k) for
  pass^k (c correct of n), averaged over prompts, with bootstrap intervals.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.evaluation.metrics import AccuracyReport
from rlhf_core.evaluation.statistics import figure_with_interval, interval_metrics
from rlhf_core.rollout.engines.base import RolloutEngine
from rlhf_core.rollout.episode_sampling import EnvironmentSettings, sample_episodes, transcript

GOLD_CALLS_COLUMN = "gold_tool_calls"
OUTCOMES = ("done", "turn_limit", "length", "context_limit")


@dataclass(frozen=True)
class TurnDecoding:
    """Decoding settings of an episode's turns (evaluation's generation settings have no top-p/top-k)."""

    max_new_tokens: int
    temperature: float
    batch_size: int
    top_p: float = 1.0
    top_k: int = 0

    @staticmethod
    def of(settings: object) -> TurnDecoding:
        return TurnDecoding(
            settings.max_new_tokens, settings.temperature, settings.batch_size,  # type: ignore[attr-defined]
            getattr(settings, "top_p", 1.0), getattr(settings, "top_k", 0),
        )  # fmt: skip


def pass_hat_k(n: int, c: int, k: int) -> float:
    """Unbiased pass^k from n trials with c successes: the chance that k trials drawn without replacement
    all succeed, C(c, k) / C(n, k) (book ch.13, tau-bench)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass^k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    return math.comb(c, k) / math.comb(n, k)


def pass_hat_k_metrics(correct: Sequence[Sequence[bool]], ks: Sequence[int], seed: int) -> dict[str, float]:
    """``eval/pass_hat_<k>`` with intervals over prompts, from per-prompt verdicts of n trials each."""
    metrics: dict[str, float] = {}
    for k in sorted(set(ks)):
        per_prompt = [pass_hat_k(len(trials), sum(map(bool, trials)), k) for trials in correct]
        metrics |= figure_with_interval(f"eval/pass_hat_{k}", per_prompt, seed)
    return metrics


def episode_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    environment: EnvironmentSettings,
    generation: object,
    verifier: Callable[[str, dict], float],
    seed: int,
    *,
    stage: str,
    engine: str | RolloutEngine = "native",
) -> AccuracyReport:
    """One episode per prompt row; rows keep prompt, answer, the final answer as ``completion``, the verdict,
    the model's tokens, the readable ``transcript``, turns, outcome and the environment's counts."""
    episodes, _, _ = sample_episodes(
        model, tokenizer, records, 1, TurnDecoding.of(generation), environment, seed, stage=stage,
        engine=None if isinstance(engine, str) else engine,
    )  # fmt: skip
    rows = []
    for record, episode in zip(records, episodes, strict=True):
        counts = {k: v for k, v in episode.items() if k not in record and isinstance(v, float)}
        rows.append({
            "prompt": record["prompt"],
            "answer": str(record.get("answer", "")),
            "completion": episode["completion"],
            "correct": verifier(episode["completion"], record) == 1.0,
            "new_tokens": episode["new_tokens"],
            "turns": episode["turns"],
            "outcome": episode["outcome"],
            "transcript": transcript(episode["messages"]),
            "tool_call_match": gold_call_match(record, episode["messages"]),
            **counts,
        })  # fmt: skip
    accuracy = sum(bool(r["correct"]) for r in rows) / max(len(rows), 1)
    return AccuracyReport(accuracy, rows)


def episode_figures(rows: list[dict], seed: int) -> dict[str, float]:
    """``eval/episode/...``, ``eval/tool_call_validity`` and ``eval/tool_call_match`` of answer episodes."""
    if not rows:
        return {}
    metrics = interval_metrics("eval/episode/turns", [float(r["turns"]) for r in rows], seed)
    metrics["eval/episode/turns"] = sum(r["turns"] for r in rows) / len(rows)
    for outcome in OUTCOMES:
        metrics[f"eval/episode/{outcome}_share"] = sum(r["outcome"] == outcome for r in rows) / len(rows)
    counts = sorted(
        {k for r in rows for k, v in r.items() if isinstance(v, float) and k != "tool_call_match"}
    )
    for name in counts:
        metrics[f"eval/episode/{name}"] = sum(r.get(name, 0.0) for r in rows) / len(rows)
    calls = sum(r.get("tool_calls", 0.0) for r in rows)
    if calls:
        metrics["eval/tool_call_validity"] = sum(r.get("valid_tool_calls", 0.0) for r in rows) / calls
    matched = [r["tool_call_match"] for r in rows if r.get("tool_call_match") is not None]
    if matched:
        metrics |= figure_with_interval("eval/tool_call_match", matched, seed)
    return metrics


def gold_call_match(record: dict, messages: list[dict]) -> float | None:
    """1.0 when the episode's tool calls, in order, are exactly the row's gold calls (name and arguments);
    None when the row has none."""
    gold = record.get(GOLD_CALLS_COLUMN)
    if gold is None:
        return None
    made = [
        call.get("function", call)
        for message in messages
        if message.get("role") == "assistant"
        for call in message.get("tool_calls") or []
    ]
    return float([_canonical(c) for c in made] == [_canonical(c) for c in gold])


def _canonical(call: dict) -> tuple[str, str]:
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):
            arguments = json.loads(arguments)
    return str(call.get("name")), json.dumps(arguments, sort_keys=True)


def sample_and_verify_episodes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    n: int,
    generation: object,
    environment: EnvironmentSettings,
    verifier: Callable[[str, dict], float],
    seed: int,
    *,
    stage: str,
    engine: str | RolloutEngine = "native",
) -> list[list[bool]]:
    """``n`` episodes per prompt row, each final answer checked by the verifier (1.0 = correct)."""
    episodes, _, _ = sample_episodes(
        model, tokenizer, records, n, TurnDecoding.of(generation), environment, seed, stage=stage,
        engine=None if isinstance(engine, str) else engine,
    )  # fmt: skip
    correct: list[list[bool]] = [[] for _ in records]
    for episode in episodes:
        index = episode["prompt_index"]
        correct[index].append(verifier(episode["completion"], records[index]) == 1.0)
    return correct
