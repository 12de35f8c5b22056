"""Registered reward models as scorers of (prompt, completion) pairs, for the stages that score text."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_core.refs import ModelRef

if TYPE_CHECKING:  # torch and transformers load only when a stage really scores
    from rlhf_core.sampling import ModelScorer


def reward_model_scorers(reward_models: dict[str, ModelRef], cache: Path) -> dict[str, ModelScorer]:
    """Reward source name -> a function scoring batches of (prompt, completion) pairs with that model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from registry.models import materialize_model
    from rlhf_core.training.reward_model import score_pairs

    scorers: dict[str, ModelScorer] = {}
    for name, ref in reward_models.items():
        directory = materialize_model(ref, cache / "models")
        model = AutoModelForSequenceClassification.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        scorers[name] = lambda pairs, model=model, tokenizer=tokenizer: score_pairs(model, tokenizer, pairs)
    return scorers
