"""The ``evaluate`` stage's work for one model: held-out NLL, verifiable accuracy, pass@k, reward-source
means, response lengths, KL to the reference, best-of-N, samples.

- held-out NLL/perplexity on the assistant tokens of an SFT eval split (``heldout_loss``);
- accuracy: one greedy (or ``generation.temperature``) completion per prompt, checked by the stage's
  verifier, a registered reward function that gives 1.0 for a correct completion; the same answers
  give the response lengths and are what reward sources score and win-rate judges compare
  (:mod:`rlhf_core.evaluation.comparison`);
- pass@k from ``pass_at_k.n`` samples per prompt (:mod:`rlhf_core.evaluation.pass_at_k`);
- KL to the reference from samples of the model at temperature 1 (:mod:`rlhf_core.evaluation.kl`);
- best-of-N (book ch.9): N samples per prompt ranked by reward sources (reward functions and/or
  reward models), the top one checked by the verifier (``rlhf_core.selection.best_of_n``).

Every figure comes with a seeded 95% bootstrap interval and its sample count (``interval_metrics``).
The answers, pass@k and best-of-N decode with the engine their settings name, one vLLM engine per model
serving all of them (:mod:`rlhf_core.evaluation.engine_choice`); the held-out loss and the KL need the
model's own forward and always run in process.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.errors import UserError
from rlhf_core.evaluation.best_of_n_curve import best_of_n_curve, curve_metrics
from rlhf_core.evaluation.engine_choice import Decoder, decoder_of, open_evaluation_engine
from rlhf_core.evaluation.episodes import (
    episode_accuracy,
    episode_figures,
    pass_hat_k_metrics,
    sample_and_verify_episodes,
)
from rlhf_core.evaluation.kl import kl_to_reference
from rlhf_core.evaluation.metrics import heldout_loss, length_metrics, verifiable_accuracy
from rlhf_core.evaluation.pass_at_k import pass_at_k_metrics, sample_and_verify
from rlhf_core.evaluation.statistics import interval_metrics
from rlhf_core.judging.endpoint_stage_judges import reward_scorers
from rlhf_core.modeling.models import load_model
from rlhf_core.rewards.composite import (
    ModelScorer,
    model_source_options,
    reward_metric_means,
    score_completions,
)
from rlhf_core.rewards.functions import RewardFunction
from rlhf_core.rewards.reward_model_scoring import load_reward_model_scorers
from rlhf_core.rewards.scorers import reads_columns, verifier_function
from rlhf_core.rollout.sampling import sample_completions
from rlhf_core.selection.best_of_n import best_of_n
from rlhf_core.spec import BestOfNSpec, EvaluateStage, RewardSourceSpec

__all__ = ["MissingAnswerError", "ModelEvaluation", "Reference", "evaluate_model", "interval_metrics"]


class MissingAnswerError(UserError):
    """Prompt rows without the reference answer a verifier needs."""


class TokenizerMismatchError(UserError):
    """The KL reference does not share the evaluated model's tokenizer (per-token log-ratios need one)."""


@dataclass
class ModelEvaluation:
    """One model's figures, its first ``samples_in_table`` answers, and every answer (``rows``: prompt,
    answer, completion, correct, new_tokens and, with reward sources or judges, ``scores``)."""

    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)


@dataclass
class Reference:
    """The reference policy of the KL figure, loaded once for every model evaluated against it."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def evaluate_model(
    model_dir: str,
    revision: str | None,
    eval_rows: list[dict],
    prompt_rows: list[dict],
    stage: EvaluateStage,
    reward_model_dirs: dict[str, str],
    seed: int,
    *,
    stage_name: str = "evaluate",
    prompts_source: str = "prompts",
    reference: Reference | None = None,
    cache_dir: Path | None = None,
    log_dir: Path | None = None,
) -> ModelEvaluation:
    """Figures (``eval/...``), table samples and answers of one model.

    ``eval_rows`` are SFT rows for the NLL (may be empty); ``prompt_rows`` are prompts with an
    ``answer``, of which the first ``stage.max_prompts`` are used (may be empty); ``reward_model_dirs``
    holds the reward models of ``stage.rewards``, of best-of-N and of the win-rate judges by source name
    (``rm:<stage>``). With ``reference``, the KL to it is measured on the prompts.
    ``prompts_source`` names the prompts in errors, e.g. "data.prompts (eval split)". ``cache_dir`` holds
    the verdict cache of endpoint judges among the reward sources (they need one). The parts that
    generate share one engine (:mod:`rlhf_core.evaluation.engine_choice`); a vLLM engine writes its log
    into ``log_dir`` (default: the temporary directory).
    """
    prompt_rows = prompt_rows[: stage.max_prompts]
    if "answer" in reads_columns(stage.verifier):
        check_answers(prompt_rows, stage_name=stage_name, source=prompts_source)
    verifier = verifier_function(stage.verifier, stage.verifier_options)
    model, tokenizer = load_model(model_dir, revision=revision)
    result = ModelEvaluation({})
    metrics = result.metrics
    if eval_rows:  # the model's own forward: never through an engine
        metrics.update(heldout_loss(model, tokenizer, eval_rows, max_length=stage.max_length, seed=seed))
    best = (*stage.best_of_n.rewards, *stage.best_of_n.gold) if stage.best_of_n else ()
    sources = (*answer_sources(stage), *best)
    scorers = (
        load_reward_model_scorers(reward_model_dirs, model_source_options(sources))
        if reward_model_dirs
        else {}
    )
    if cache_dir is not None:  # judges behind endpoints among the reward sources (verdicts cached there)
        scorers |= reward_scorers(sources, cache_dir, stage_name)
    with open_evaluation_engine(
        stage, model, tokenizer, generates=bool(prompt_rows), stage_name=stage_name,
        log_dir=log_dir or Path(tempfile.gettempdir()),
    ) as engine:  # fmt: skip
        if prompt_rows:
            answer_prompts(
                result, model, tokenizer, prompt_rows, stage, verifier, scorers, seed, stage_name, engine
            )
        if stage.pass_at_k is not None and prompt_rows:
            metrics |= pass_at_k_figures(
                model, tokenizer, prompt_rows, stage, verifier, seed, stage_name, engine
            )
        if stage.best_of_n is not None:
            spec = stage.best_of_n
            metrics |= best_of_n_metrics(
                model, tokenizer, prompt_rows, spec, verifier, scorers, seed, stage_name,
                engine=decoder_of(spec.generation.engine, engine),
            )  # fmt: skip
    if reference is not None and stage.kl is not None and prompt_rows:
        check_same_tokenizer(tokenizer, reference, stage_name)
        kl = stage.kl
        metrics |= kl_to_reference(  # samples and log-probs from the model's own forward (native loop)
            model, reference.model, tokenizer, [r["prompt"] for r in prompt_rows],
            samples_per_prompt=kl.samples_per_prompt, max_new_tokens=kl.max_new_tokens,
            batch_size=kl.batch_size, seed=seed,
        )  # fmt: skip
    return result


def answer_prompts(
    result: ModelEvaluation,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_rows: list[dict],
    stage: EvaluateStage,
    verifier: RewardFunction,
    scorers: dict[str, ModelScorer],
    seed: int,
    stage_name: str,
    engine: Decoder,
) -> None:
    """One answer per prompt (``stage.generation``): accuracy, lengths and reward means into
    ``result.metrics``, the answers (scored by the answer sources) into ``result.rows`` and ``samples``."""
    gen, metrics = stage.generation, result.metrics
    if stage.environment is not None:  # task success over episodes (book ch.13)
        accuracy = episode_accuracy(
            model, tokenizer, prompt_rows, stage.environment, gen, verifier, seed, stage=stage_name,
            engine=decoder_of(gen.engine, engine),
        )  # fmt: skip
        metrics |= episode_figures(accuracy.rows, seed)
    else:
        accuracy = verifiable_accuracy(
            model, tokenizer, prompt_rows, verifier, max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature, batch_size=gen.batch_size, seed=seed,
            engine=decoder_of(gen.engine, engine),
        )  # fmt: skip
    metrics["eval/accuracy"] = accuracy.accuracy
    metrics |= interval_metrics("eval/accuracy", [float(r["correct"]) for r in accuracy.rows], seed)
    metrics |= length_metrics([int(r["new_tokens"]) for r in accuracy.rows], seed)
    result.rows, result.samples = accuracy.rows, accuracy.rows[: stage.samples_in_table]
    sources = answer_sources(stage)
    if sources:
        result.rows = score_answers(accuracy.rows, prompt_rows, sources, scorers, stage_name)
        metrics |= completion_rewards(result.rows, stage, seed)


def pass_at_k_figures(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_rows: list[dict],
    stage: EvaluateStage,
    verifier: RewardFunction,
    seed: int,
    stage_name: str,
    engine: Decoder,
) -> dict[str, float]:
    """pass@k from ``pass_at_k.n`` samples per prompt; with an environment, of episodes, and pass^k too."""
    spec = stage.pass_at_k
    assert spec is not None
    decoder = decoder_of(spec.generation.engine, engine)
    if stage.environment is None:
        correct = sample_and_verify(model, tokenizer, prompt_rows, spec, verifier, seed, engine=decoder)
        return pass_at_k_metrics(correct, spec.k, seed)
    correct = sample_and_verify_episodes(
        model, tokenizer, prompt_rows, spec.n, spec.generation, stage.environment, verifier, seed,
        stage=stage_name, engine=decoder,
    )  # fmt: skip
    return pass_at_k_metrics(correct, spec.k, seed) | pass_hat_k_metrics(correct, spec.k, seed)


def answer_sources(stage: EvaluateStage) -> tuple[RewardSourceSpec, ...]:
    """Reward sources that score each model's answers: ``stage.rewards`` and the win-rate reward judges."""
    sources = {s.name: s for s in stage.rewards}
    for judge in stage.win_rate.judges if stage.win_rate else ():
        source = judge.reward_source()
        if source is not None:
            sources.setdefault(source.name, source)
    return tuple(sources.values())


def score_answers(
    rows: list[dict],
    prompt_rows: list[dict],
    sources: tuple[RewardSourceSpec, ...],
    scorers: dict[str, ModelScorer],
    stage_name: str,
) -> list[dict]:
    """The answer rows with ``scores`` (source name -> score) from every source."""
    joined = [{**record, **row} for record, row in zip(prompt_rows, rows, strict=True)]
    scored, _ = score_completions(joined, sources, scorers, on_invalid="fail", stage=stage_name)
    return [
        {**row, "scores": s["scores"], "reward_metrics": s["reward_metrics"]}
        for row, s in zip(rows, scored, strict=True)
    ]


def completion_rewards(rows: list[dict], stage: EvaluateStage, seed: int) -> dict[str, float]:
    """Mean score of each of ``stage.rewards`` over the model's answers (scored ``rows``, one per prompt),
    and of each extra metric their functions returned (``eval/reward/<source>/<metric>``)."""
    metrics: dict[str, float] = {}
    for source in stage.rewards:
        scores = [r["scores"][source.name] for r in rows]
        metrics[f"eval/reward/{source.name}"] = sum(scores) / len(scores)
        metrics |= interval_metrics(f"eval/reward/{source.name}", scores, seed)
    own = {s.name for s in stage.rewards}  # the extra metrics of those sources' functions
    means = reward_metric_means(rows)
    metrics |= {f"eval/reward/{name}": v for name, v in means.items() if name.split("/")[0] in own}
    return metrics


def check_answers(prompt_rows: list[dict], *, stage_name: str, source: str) -> None:
    """Accuracy needs a reference answer per prompt: a row without one is an error, not a silent 0."""
    unanswered = [i for i, row in enumerate(prompt_rows) if not str(row.get("answer", "")).strip()]
    if unanswered:
        raise MissingAnswerError(
            f"stage '{stage_name}', field prompts: {len(unanswered)} row(s) of {source}, e.g. row "
            f"{unanswered[0]} (0-based), have no 'answer'; the verifier needs one"
        )


def check_same_tokenizer(tokenizer: PreTrainedTokenizerBase, reference: Reference, stage_name: str) -> None:
    if tokenizer.get_vocab() != reference.tokenizer.get_vocab():
        raise TokenizerMismatchError(
            f"stage '{stage_name}', field reference: '{reference.name}' has another tokenizer than the "
            "model evaluated; the KL compares per-token log-probs, so the reference must share it"
        )


def best_of_n_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_rows: list[dict],
    spec: BestOfNSpec,
    verifier: RewardFunction,
    scorers: dict[str, ModelScorer],
    seed: int,
    stage_name: str,
    engine: Decoder | None = None,
) -> dict[str, float]:
    """Sample N per prompt, score with the best_of_n reward sources, pick the top one, verify it; with
    ``spec.curve``, the best-of-N curve of proxy and gold reward too (:mod:`.best_of_n_curve`).
    ``engine``: an open rollout engine holding the model's weights (default: ``spec.generation``'s loop)."""
    rows, _, _ = sample_completions(
        model, tokenizer, prompt_rows, spec.n, spec.generation, seed, engine=engine
    )
    scored, _ = score_completions(rows, spec.rewards, scorers, on_invalid="fail", stage=stage_name)
    metrics = best_of_n(scored, lambda row: verifier(row["completion"], row) == 1.0).metrics()
    if spec.curve:
        if spec.gold:
            judged, _ = score_completions(scored, spec.gold, scorers, on_invalid="fail", stage=stage_name)
            gold = [row["reward"] for row in judged]
        else:
            gold = [verifier(row["completion"], row) for row in scored]
        metrics |= curve_metrics(best_of_n_curve(scored, gold, spec.curve_sizes()))
    return metrics
