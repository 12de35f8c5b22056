"""The ``evaluate`` stage's work for one model: held-out loss, verifiable accuracy, best-of-N, samples.

- held-out loss/perplexity on the assistant tokens of an SFT eval split (``heldout_loss``);
- accuracy: one greedy (or ``generation.temperature``) completion per prompt, checked by the stage's
  verifier, a registered reward function that gives 1.0 for a correct completion; reported with a
  seeded 95% bootstrap interval over prompts and the prompt count (as are reward-source means);
- best-of-N (book ch.9): N samples per prompt ranked by reward sources (reward functions and/or
  reward models), the top one checked by the verifier (``rlhf_core.selection.best_of_n``).
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.errors import UserError
from rlhf_core.evaluation.metrics import heldout_loss, verifiable_accuracy
from rlhf_core.evaluation.statistics import bootstrap_interval
from rlhf_core.modeling.models import load_model
from rlhf_core.rewards.composite import ModelScorer, score_completions
from rlhf_core.rewards.functions import RewardFunction, verifier_function
from rlhf_core.rewards.reward_model_scoring import load_reward_model_scorers
from rlhf_core.rollout.sampling import sample_completions
from rlhf_core.selection.best_of_n import best_of_n
from rlhf_core.spec import BestOfNSpec, EvaluateStage


class MissingAnswerError(UserError):
    """Prompt rows without the reference answer a verifier needs."""


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
) -> tuple[dict[str, float], list[dict]]:
    """Metrics (``eval/...``) and the first ``stage.samples_in_table`` verified generations of one model.

    ``eval_rows`` are SFT rows for the loss (may be empty); ``prompt_rows`` are prompts with an
    ``answer``, of which the first ``stage.max_prompts`` are used (may be empty); ``reward_model_dirs``
    holds the reward models of ``stage.rewards`` and of best-of-N by source name (``rm:<stage>``).
    ``prompts_source`` names the prompts in errors, e.g. "data.prompts (eval split)".
    """
    prompt_rows = prompt_rows[: stage.max_prompts]
    check_answers(prompt_rows, stage_name=stage_name, source=prompts_source)
    verifier = verifier_function(stage.verifier)
    model, tokenizer = load_model(model_dir, revision=revision)
    metrics: dict[str, float] = {}
    samples: list[dict] = []
    if eval_rows:
        metrics.update(heldout_loss(model, tokenizer, eval_rows, max_length=stage.max_length))
    if prompt_rows:
        gen = stage.generation
        accuracy = verifiable_accuracy(
            model, tokenizer, prompt_rows, verifier, max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature, batch_size=gen.batch_size, seed=seed, engine=gen.engine,
        )  # fmt: skip
        metrics["eval/accuracy"] = accuracy.accuracy
        metrics |= interval_metrics("eval/accuracy", [float(r["correct"]) for r in accuracy.rows], seed)
        samples = accuracy.rows[: stage.samples_in_table]
    scorers = load_reward_model_scorers(reward_model_dirs) if reward_model_dirs else {}
    if stage.rewards and prompt_rows:
        metrics.update(completion_rewards(accuracy.rows, prompt_rows, stage, scorers, stage_name, seed))
    if stage.best_of_n is not None:
        spec = stage.best_of_n
        metrics.update(
            best_of_n_metrics(model, tokenizer, prompt_rows, spec, verifier, scorers, seed, stage_name)
        )
    return metrics, samples


def completion_rewards(
    rows: list[dict],
    prompt_rows: list[dict],
    stage: EvaluateStage,
    scorers: dict[str, ModelScorer],
    stage_name: str,
    seed: int,
) -> dict[str, float]:
    """Mean score of each of ``stage.rewards`` over the model's completions (``rows``, one per prompt)."""
    scored_rows = [{**record, **row} for record, row in zip(prompt_rows, rows, strict=True)]
    scored, _ = score_completions(scored_rows, stage.rewards, scorers, on_invalid="fail", stage=stage_name)
    metrics: dict[str, float] = {}
    for source in stage.rewards:
        scores = [r["scores"][source.name] for r in scored]
        metrics[f"eval/reward/{source.name}"] = sum(scores) / len(scores)
        metrics |= interval_metrics(f"eval/reward/{source.name}", scores, seed)
    return metrics


def interval_metrics(name: str, values: list[float], seed: int) -> dict[str, float]:
    """``<name>_ci_low`` / ``_ci_high`` (95% percentile bootstrap, 1000 resamples, seeded) and ``_n``."""
    interval = bootstrap_interval(values, seed=seed)
    return {
        f"{name}_ci_low": interval.low,
        f"{name}_ci_high": interval.high,
        f"{name}_n": float(interval.samples),
    }


def check_answers(prompt_rows: list[dict], *, stage_name: str, source: str) -> None:
    """Accuracy needs a reference answer per prompt: a row without one is an error, not a silent 0."""
    unanswered = [i for i, row in enumerate(prompt_rows) if not str(row.get("answer", "")).strip()]
    if unanswered:
        raise MissingAnswerError(
            f"stage '{stage_name}', field prompts: {len(unanswered)} row(s) of {source}, e.g. row "
            f"{unanswered[0]} (0-based), have no 'answer'; the verifier needs one"
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
) -> dict[str, float]:
    """Sample N per prompt, score with the best_of_n reward sources, pick the top one, verify it."""
    rows, _, _ = sample_completions(model, tokenizer, prompt_rows, spec.n, spec.generation, seed)
    scored, _ = score_completions(rows, spec.rewards, scorers, on_invalid="fail", stage=stage_name)
    return best_of_n(scored, lambda row: verifier(row["completion"], row) == 1.0).metrics()
