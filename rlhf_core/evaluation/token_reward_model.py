"""Held-out figures of an outcome or a process reward model (book ch.5).

ORM, on ``outcome`` rows, each completion scored as the reward source scores it by default
(sigma of the last token's logit, :mod:`rlhf_core.rewards.token_aggregation`):

- ``eval/loss``: the training objective on the held-out rows;
- ``eval/top1_accuracy``: over prompts with several completions, whether the top-scored one is correct
  (ties at the top count as a random pick among them: the fraction of them that are correct);
- ``eval/pairwise_accuracy``: over (correct, incorrect) completions of the same prompt, whether the
  correct one scores higher (a tie counts 1/2);
- ``eval/reward_correct_mean``, ``eval/reward_incorrect_mean``.

PRM, on ``step_labels`` rows:

- ``eval/loss``;
- ``eval/step_accuracy``: each step's prediction against its label (binary: P(good) > 1/2 vs label 1;
  three classes: the most likely rating vs the rating);
- ``eval/solution_accuracy``: a solution's default score (the min over steps) above 1/2 vs all its
  steps rated good;
- ``eval/reward_correct_mean``, ``eval/reward_incorrect_mean``: that score for all-good solutions and
  for the others.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.data.schemas import prompt_key
from rlhf_core.modeling.modes import eval_mode
from rlhf_core.modeling.token_reward_examples import (
    PER_STEP,
    LabelledTokens,
    collate,
    micro_batch_loss,
    outcome_examples,
    step_examples,
)
from rlhf_core.rewards.token_aggregation import aggregate_outcome, aggregate_steps
from rlhf_core.rewards.token_reward_scoring import probabilities_at
from rlhf_core.spec.stages.outcome_process_rewards import ProcessRewardModelStage

_UNLIMITED = 1 << 30  # held-out rows are scored whatever their length


@torch.no_grad()
def heldout_loss(
    model: PreTrainedModel,
    examples: list[LabelledTokens],
    objective: str,
    pad_token_id: int,
    batch_size: int = 16,
) -> float:
    """The training objective over all ``examples``: the mean over sequences (ORM) or steps (PRM)."""
    device = next(model.parameters()).device
    total, units = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            part = examples[start : start + batch_size]
            n = sum(len(e.positions) for e in part) if objective in PER_STEP else len(part)
            loss, _ = micro_batch_loss(model, collate(part, pad_token_id), objective, device)
            total, units = total + loss.item() * n, units + n
    return total / units


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def ranking_figures(scores: list[float], correct: list[bool], prompts: list[str]) -> dict[str, float]:
    """top-1 and pairwise accuracy within prompts, and the mean score of correct and incorrect ones."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(prompts):
        groups.setdefault(key, []).append(i)
    top1, pairwise = [], []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        best = max(scores[i] for i in idx)
        top = [i for i in idx if scores[i] == best]
        top1.append(sum(correct[i] for i in top) / len(top))
        for c in (i for i in idx if correct[i]):
            for w in (i for i in idx if not correct[i]):
                pairwise.append(1.0 if scores[c] > scores[w] else 0.5 if scores[c] == scores[w] else 0.0)
    figures = {
        "eval/top1_accuracy": _mean(top1),
        "eval/pairwise_accuracy": _mean(pairwise),
        "eval/reward_correct_mean": _mean([s for s, ok in zip(scores, correct, strict=True) if ok]),
        "eval/reward_incorrect_mean": _mean([s for s, ok in zip(scores, correct, strict=True) if not ok]),
    }
    return {name: value for name, value in figures.items() if value is not None}


def evaluate_outcome_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict], objective: str
) -> dict[str, float]:
    """The ORM's held-out figures on ``outcome`` rows (see the module docstring)."""
    examples, _ = outcome_examples(rows, tokenizer, _UNLIMITED, "skip", "held-out outcomes")
    probs = probabilities_at(
        model, [e.ids for e in examples], [e.positions for e in examples], tokenizer.pad_token_id
    )
    scores = [aggregate_outcome(p) for p in probs]
    correct = [e.labels[0] == 1.0 for e in examples]
    prompts = [prompt_key(rows[e.row]["prompt"]) for e in examples]
    loss = heldout_loss(model, examples, objective, tokenizer.pad_token_id)
    return {"eval/loss": loss} | ranking_figures(scores, correct, prompts)


def evaluate_process_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    stage: ProcessRewardModelStage,
) -> dict[str, float]:
    """The PRM's held-out figures on ``step_labels`` rows (see the module docstring)."""
    examples, _ = step_examples(
        rows, tokenizer, separator=stage.separator, max_steps=stage.train.max_solution_steps,
        max_length=_UNLIMITED, on_overlong="skip", source="held-out step labels",
    )  # fmt: skip
    hits = _step_hits(model, examples, tokenizer.pad_token_id, stage.labels)
    good = probabilities_at(
        model, [e.ids for e in examples], [e.positions for e in examples], tokenizer.pad_token_id
    )
    scores = [aggregate_steps(q) for q in good]
    all_good = [all(v == 1 for v in e.labels) for e in examples]
    solution_hits = [(s > 0.5) == ok for s, ok in zip(scores, all_good, strict=True)]
    figures = {
        "eval/loss": heldout_loss(model, examples, stage.labels, tokenizer.pad_token_id),
        "eval/step_accuracy": sum(hits) / len(hits),
        "eval/solution_accuracy": sum(solution_hits) / len(solution_hits),
    }
    ranked = ranking_figures(scores, all_good, [str(i) for i in range(len(scores))])
    return figures | {k: v for k, v in ranked.items() if k.startswith("eval/reward_")}


@torch.no_grad()
def _step_hits(
    model: PreTrainedModel, examples: list[LabelledTokens], pad_token_id: int, labels: str
) -> list[bool]:
    """Whether each step's prediction matches its label (see ``eval/step_accuracy``)."""
    from rlhf_core.modeling.token_reward_model import token_logits

    device = next(model.parameters()).device
    hits: list[bool] = []
    with eval_mode(model):
        for start in range(0, len(examples), 16):
            batch = collate(examples[start : start + 16], pad_token_id).to(device)
            logits = token_logits(model, batch.ids, batch.real)[batch.mask]  # (steps, C)
            truth = batch.labels[batch.mask]
            if labels == "three_class":
                hits += (logits.argmax(-1) == truth.long() + 1).tolist()
            else:
                hits += ((logits[:, 0] > 0) == (truth == 1)).tolist()
    return hits
