"""The rollout engine of the ``evaluate`` stage: one per evaluated model, shared by its generating parts.

The answers (accuracy, lengths, reward means, win rates), the pass@k samples and the best-of-N samples
each name an engine (``generation.engine``, ``pass_at_k.generation.engine``,
``best_of_n.generation.engine``). When any of them names ``vllm``, one vLLM engine is started from the
model for all of them (a start costs ~25 s on a CPU), with the stage's
:meth:`~rlhf_core.spec.EvaluateStage.vllm_settings`; the other parts keep their in-process loop. The
held-out loss and the KL to the reference always run in process: both need the model's own forward pass
(log-probs of given tokens), which a generation engine does not offer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.rollout.engines.base import RolloutEngine
from rlhf_core.rollout.engines.opening import open_engine
from rlhf_core.spec import EvaluateStage
from rlhf_core.spec.engines import VLLMSpec

Decoder = str | RolloutEngine  # an in-process loop by name, or an open engine


@dataclass(frozen=True)
class EngineSettings:
    """The engine :func:`~rlhf_core.rollout.engines.opening.open_engine` opens, and its vLLM settings."""

    engine: str
    vllm: VLLMSpec


@contextmanager
def open_evaluation_engine(
    stage: EvaluateStage,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    generates: bool,
    stage_name: str,
    log_dir: Path,
) -> Iterator[Decoder]:
    """The vLLM engine of ``model`` for the ``with`` block when a part of the stage uses it and the model
    ``generates`` at all (there are prompts), else the name ``native``; see :func:`decoder_of`."""
    settings = stage.vllm_settings() if generates else None
    choice = (
        EngineSettings("vllm", settings) if settings is not None else EngineSettings("native", VLLMSpec())
    )
    with open_engine(choice, model, tokenizer, stage=stage_name, log_dir=log_dir) as engine:
        yield engine


def decoder_of(part_engine: str, opened: Decoder) -> Decoder:
    """What a part whose settings name ``part_engine`` decodes with: the opened engine for ``vllm`` (or
    the native loop when none was opened: nothing to generate), else its own in-process loop."""
    return opened if part_engine == "vllm" else part_engine
