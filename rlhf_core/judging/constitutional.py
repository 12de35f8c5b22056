"""Constitutional AI, supervised part: critique and revise answers under sampled principles (book ch.12,
Bai et al. 2022).

For each prompt x the policy answers y^0. Then for i = 0 .. n-1 a principle c_i is drawn from the
constitution C (uniformly, with replacement, from a generator seeded by the stage seed and the prompt's
index, so the same seed draws the same chain), and the critic is asked

1. for a critique of y^i under c_i (c_i's critique request), then
2. for a revision of y^i given that critique (c_i's revision request), which is y^{i+1}.

The result per prompt is the chain {y^0, ..., y^n} with {c_0, ..., c_{n-1}} and the critiques; the SFT
datum is (x, y^n) and the preference datum (x, chosen y^n, rejected y^0). A revision that is empty
(after an optional leading ``Revision:`` label) drops its prompt and is counted, or stops the stage
naming the row (``on_error``).

Entry points: :func:`revise_with_constitution` (any critic, a ``prompts -> answers`` function) and
:func:`run_constitutional_revision` (the stage's work: models loaded, outputs split).
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rlhf_core.data.loading import split_records
from rlhf_core.errors import UserError
from rlhf_core.judging.endpoint_judge import chat_endpoint_generate
from rlhf_core.judging.endpoint_stage_judges import judge_cache
from rlhf_core.judging.policy_judge import GenerateFn  # prompts -> answers, in order
from rlhf_core.spec.stages.constitutional import ConstitutionalRevisionStage, ConstitutionPrinciple
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.stage_results import StageResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rlhf_core.rollout.engines.base import RolloutEngine

REVISION_LABEL = re.compile(r"^\s*revision\s*:\s*", re.IGNORECASE)
CRITIC_SEEDS = 100_003  # a critic policy's calls draw from seed + this, apart from the policy's calls
SFT_COLUMNS = ("completion", "critiques", "initial_completion", "principles", "prompt", "revisions")
PAIR_COLUMNS = ("chosen", "margin", "principles", "prompt", "rejected")


class RevisionError(UserError):
    """A critic's revision was empty and the stage is set to fail on it."""


def critique_prompt(question: str, response: str, principle: ConstitutionPrinciple) -> str:
    """The critic's request for a critique of ``response`` under one principle."""
    return (
        f"[Question]\n{question}\n\n[Response]\n{response}\n\n"
        f"[Critique request]\n{principle.critique_request}\n\nWrite the critique only."
    )


def revision_prompt(question: str, response: str, principle: ConstitutionPrinciple, critique: str) -> str:
    """The critic's request for a revision of ``response``, given its critique under the principle."""
    return (
        f"[Question]\n{question}\n\n[Response]\n{response}\n\n"
        f"[Critique request]\n{principle.critique_request}\n\n[Critique]\n{critique}\n\n"
        f"[Revision request]\n{principle.revision_request}"
    )


def clean_revision(text: str) -> str:
    """The revision without surrounding space and without a leading ``Revision:`` label."""
    return REVISION_LABEL.sub("", text.strip()).strip()


def principle_label(principle: ConstitutionPrinciple) -> str:
    """How a principle is named in output rows: its short text, else its critique request."""
    return principle.principle or principle.critique_request


def draw_principles(n_principles: int, rounds: int, seed: int, row: int) -> list[int]:
    """Indices of the principles c_0 .. c_{n-1} of one row: uniform with replacement, seeded by
    (seed, row) only, so a row's chain does not depend on the other rows."""
    rng = random.Random(f"constitution:{seed}:{row}")
    return [rng.randrange(n_principles) for _ in range(rounds)]


@dataclass
class RevisionChain:
    """One prompt's chain: y^0 .. y^n in ``answers``, c_0 .. c_{n-1} and the critiques."""

    row: int  # index of the prompt row
    prompt: str
    answers: list[str]
    principles: list[int]
    critiques: list[str] = field(default_factory=list)


def revise_with_constitution(
    prompts: Sequence[str],
    first_answers: Sequence[str],
    constitution: Sequence[ConstitutionPrinciple],
    rounds: int,
    critic: GenerateFn,
    *,
    seed: int,
    on_error: str,
    stage: str,
) -> tuple[list[RevisionChain], list[str]]:
    """The finished chains and one problem line per prompt dropped for an empty revision.

    Each round asks the critic for all live chains at once (critiques, then revisions), so a batched or
    concurrent critic sees whole batches."""
    chains = [
        RevisionChain(i, p, [y0], draw_principles(len(constitution), rounds, seed, i))
        for i, (p, y0) in enumerate(zip(prompts, first_answers, strict=True))
    ]
    problems: list[str] = []
    for step in range(rounds):
        rules = [constitution[c.principles[step]] for c in chains]
        critiques = critic(
            [critique_prompt(c.prompt, c.answers[-1], r) for c, r in zip(chains, rules, strict=True)]
        )
        revisions = critic(
            [
                revision_prompt(c.prompt, c.answers[-1], r, k)
                for c, r, k in zip(chains, rules, critiques, strict=True)
            ]
        )
        live = []
        for chain, critique, revision in zip(chains, critiques, revisions, strict=True):
            text = clean_revision(revision)
            if not text:
                where = f"stage '{stage}': row {chain.row} (0-based), revision {step + 1} of {rounds}"
                if on_error == "fail":
                    raise RevisionError(
                        f"{where}: the critic's revision is empty ({revision[:120]!r}); set on_error: skip "
                        "to drop such prompts and count them"
                    )
                problems.append(f"{where}: empty revision {revision[:120]!r}; prompt dropped")
                continue
            chain.critiques.append(critique.strip())
            chain.answers.append(text)
            live.append(chain)
        chains = live
    return chains, problems


def chain_records(chain: RevisionChain, constitution: Sequence[ConstitutionPrinciple]) -> tuple[dict, dict]:
    """The chain's SFT row (x, y^n with the chain) and preference row (x, y^n over y^0)."""
    principles = [principle_label(constitution[i]) for i in chain.principles]
    sft = {
        "prompt": chain.prompt,
        "completion": chain.answers[-1],
        "initial_completion": chain.answers[0],
        "principles": principles,
        "critiques": chain.critiques,
        "revisions": chain.answers[1:],
    }
    pair = {
        "prompt": chain.prompt,
        "chosen": chain.answers[-1],
        "rejected": chain.answers[0],
        "margin": 1.0,
        "principles": principles,
    }
    return sft, pair


@dataclass(frozen=True)
class ConstitutionalInputs:
    """The stage's resolved inputs: the policy, the prompt rows of its split, and the critic policy
    (None: the policy critiques and revises its own answers, or the critic is an endpoint)."""

    policy_dir: str
    policy_revision: str | None
    prompt_rows: list[dict]
    critic_dir: str | None = None
    critic_revision: str | None = None


@dataclass
class ConstitutionalResult(StageResult):
    """SFT rows and preference rows by split, and the prompts dropped."""

    sft: dict[str, list[dict]]
    preferences: dict[str, list[dict]]
    problems: list[str] = field(default_factory=list)
    unchanged: int = 0  # prompts whose y^n equals y^0: an SFT row, no preference pair

    def summary(self) -> dict[str, float]:
        return {
            "sft_rows": float(sum(len(rows) for rows in self.sft.values())),
            "pairs": float(sum(len(rows) for rows in self.preferences.values())),
            "dropped_empty_revision": float(len(self.problems)),
            "dropped_unchanged_pair": float(self.unchanged),
        }


def run_constitutional_revision(
    stage: ConstitutionalRevisionStage, inputs: ConstitutionalInputs, env: StageEnvironment
) -> ConstitutionalResult:
    """The stage's work: first answers from the policy, ``stage.revisions`` rounds by the critic, then
    SFT and preference rows split per prompt by ``stage.splits``."""
    rows = inputs.prompt_rows[: stage.max_prompts] if stage.max_prompts else inputs.prompt_rows
    if not rows:
        raise UserError(f"stage '{env.stage}': split '{stage.split}' of the prompts has no rows")
    prompts = [row["prompt"] for row in rows]
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(
                f"stage '{env.stage}': prompt row {i} (0-based), column 'prompt': expected non-empty text "
                f"(critique and revision quote it), got {prompt!r:.80}"
            )
    with open_policy_and_critic(stage, inputs, env) as (answer, critic):
        first = answer(prompts)
        chains, problems = revise_with_constitution(
            prompts, first, stage.constitution, stage.revisions, critic,
            seed=env.seed, on_error=stage.on_error, stage=env.stage,
        )  # fmt: skip
    if not chains:
        raise UserError(f"stage '{env.stage}': every prompt was dropped ({len(problems)} empty revisions)")
    records = [chain_records(c, stage.constitution) for c in chains]
    by_split = split_records(records, dict(stage.splits), env.seed)
    sft = {name: [s for s, _ in part] for name, part in by_split.items()}
    pairs = {name: [p for _, p in part if p["chosen"] != p["rejected"]] for name, part in by_split.items()}
    unchanged = sum(len(part) for part in by_split.values()) - sum(len(p) for p in pairs.values())
    return ConstitutionalResult(sft, pairs, problems, unchanged)


@contextmanager
def open_policy_and_critic(
    stage: ConstitutionalRevisionStage, inputs: ConstitutionalInputs, env: StageEnvironment
) -> Iterator[tuple[GenerateFn, GenerateFn]]:
    """(answer, critic) functions: the policy sampling with ``stage.generation``; the critic the same
    policy, the critic policy, or the endpoint (greedy, its answers in the home's verdict cache)."""
    from rlhf_core.modeling.models import load_model  # torch only when the stage runs
    from rlhf_core.rollout.engines.opening import open_engine

    model, tokenizer = load_model(inputs.policy_dir, revision=inputs.policy_revision)
    with open_engine(stage.generation, model, tokenizer, stage=env.stage, log_dir=env.work_dir) as engine:
        answer = sampling_generate(model, tokenizer, engine, stage, env.seed)
        if stage.critic_endpoint is not None:
            yield answer, chat_endpoint_generate(stage.critic_endpoint, judge_cache(env.cache_dir))
        elif inputs.critic_dir is None:
            yield answer, answer
        else:
            critic_model, critic_tokenizer = load_model(inputs.critic_dir, revision=inputs.critic_revision)
            # a second vLLM engine would not fit beside the first: the critic policy decodes natively then
            loop = "native" if stage.generation.engine == "vllm" else stage.generation.engine
            critic = sampling_generate(critic_model, critic_tokenizer, loop, stage, env.seed + CRITIC_SEEDS)
            yield answer, critic


def sampling_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    engine: str | RolloutEngine,
    stage: ConstitutionalRevisionStage,
    seed: int,
) -> GenerateFn:
    """A ``prompts -> answers`` function decoding with ``stage.generation``; each call draws from its own
    seed (``seed``, ``seed + 1``, ...), so a re-run repeats every call."""
    from rlhf_core.rollout.generation import generate_completions

    calls, cfg = itertools.count(seed), stage.generation

    def generate(prompts: list[str]) -> list[str]:
        return generate_completions(
            model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_p=cfg.top_p, top_k=cfg.top_k, batch_size=cfg.batch_size, seed=next(calls), engine=engine,
        )  # fmt: skip

    return generate
