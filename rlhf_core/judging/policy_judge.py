"""A policy model as pairwise judge (LLM-as-a-judge with a written rubric or constitution; book ch.5, ch.12).

The judge reads the principles, the user's question and two responses, and must end its verdict with
``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie), as in the MT-Bench judge prompt. Position bias is controlled by
asking twice with the responses swapped: the pair is labelled only when both verdicts agree; otherwise
it is a tie. A verdict without a parseable label is a parse failure, which the caller fails on or skips.

The judge model answers greedily through the engine its spec names (:func:`open_policy_judge`): the
native loop, ``model.generate``, or a vLLM engine started from the judge model (issue 19).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rlhf_core.errors import UserError
from rlhf_core.modeling.models import load_model
from rlhf_core.rollout.engines.opening import open_engine
from rlhf_core.rollout.generation import generate_completions
from rlhf_core.spec import PolicyJudgeSpec

VERDICT = re.compile(r"\[\[([ABC])\]\]")

GenerateFn = Callable[[list[str]], list[str]]  # judge prompts -> judge outputs (greedy)


class JudgeParseError(UserError):
    """The judge's output contains no [[A]], [[B]] or [[C]] verdict."""


def judge_prompt(principles: Sequence[str], question: str, response_a: str, response_b: str) -> str:
    rules = "\n".join(f"- {p}" for p in principles)
    return (
        "You are an impartial judge. Compare the two responses to the user's question using these "
        f"principles:\n{rules}\nIgnore the order of the responses and their length.\n\n"
        f"[Question]\n{question}\n\n[Response A]\n{response_a}\n\n[Response B]\n{response_b}\n\n"
        "Explain briefly, then end with [[A]] if A is better, [[B]] if B is better, or [[C]] for a tie."
    )


def parse_verdict(output: str) -> str:
    """The last [[A]]/[[B]]/[[C]] in the output; raises JudgeParseError when there is none."""
    found = VERDICT.findall(output)
    if not found:
        raise JudgeParseError(f"no [[A]], [[B]] or [[C]] verdict in judge output {output[:120]!r}")
    return found[-1]


def principle_subsets(
    principles: Sequence[str], per_comparison: int | None, pairs: list[tuple[str, str, str]], seed: int
) -> list[tuple[str, ...]] | None:
    """The principles each pair is judged by: None (every principle, for every pair) when
    ``per_comparison`` is None, else ``per_comparison`` principles per pair, drawn without replacement
    and kept in constitution order, as Constitutional AI's feedback model sees a subset of the
    constitution per comparison (book ch.12). The draw is seeded by ``seed`` and the pair's own texts,
    so a pair gets the same subset whatever the other rows are."""
    if per_comparison is None:
        return None
    subsets = []
    for pair in pairs:
        rng = random.Random(json.dumps([seed, *pair]))
        chosen = sorted(rng.sample(range(len(principles)), per_comparison))
        subsets.append(tuple(principles[i] for i in chosen))
    return subsets


def judge_pairs(
    generate: GenerateFn,
    principles: Sequence[str],
    pairs: list[tuple[str, str, str]],
    subsets: Sequence[Sequence[str]] | None = None,
) -> list[str | Exception]:
    """Verdict per (question, first, second): 'first', 'second', 'tie', or the parse error.

    Each pair is judged in both orders, under the same principles (``subsets[i]`` for pair i when given,
    else ``principles``); disagreement between the two orders counts as a tie.
    """
    prompts = []
    for i, (question, first, second) in enumerate(pairs):
        rules = principles if subsets is None else subsets[i]
        prompts += [
            judge_prompt(rules, question, first, second),
            judge_prompt(rules, question, second, first),
        ]
    outputs = generate(prompts)
    verdicts: list[str | Exception] = []
    for i in range(len(pairs)):
        try:
            forward, backward = parse_verdict(outputs[2 * i]), parse_verdict(outputs[2 * i + 1])
        except JudgeParseError as exc:
            verdicts.append(exc)
            continue
        if forward == "A" and backward == "B":
            verdicts.append("first")
        elif forward == "B" and backward == "A":
            verdicts.append("second")
        else:
            verdicts.append("tie")
    return verdicts


@contextmanager
def open_policy_judge(
    spec: PolicyJudgeSpec, model_dir: str, revision: str | None, *, stage: str, log_dir: Path
) -> Iterator[GenerateFn]:
    """The judge model of ``spec``, loaded and decoding with ``spec.engine`` for the ``with`` block, as a
    greedy judge prompts -> outputs function; a vLLM engine logs to ``<log_dir>/vllm-server.log``."""
    model, tokenizer = load_model(model_dir, revision=revision)
    with open_engine(spec, model, tokenizer, stage=stage, log_dir=log_dir) as engine:

        def generate(prompts: list[str]) -> list[str]:
            return generate_completions(
                model, tokenizer, prompts, max_new_tokens=spec.max_new_tokens, engine=engine
            )

        yield generate
