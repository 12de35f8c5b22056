"""What every trainer returns: one base type, extended by each family, itself a
``rlhf_core.stage_results.StageResult`` like the results of the other stage kinds; a training kind's
entry point (``run(stage, inputs, env)``) hands back the trained model and its tokenizer in it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rlhf_core.stage_results import StageResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(kw_only=True)
class TrainingResult(StageResult):
    """The run's size, where it resumed, its last loss and its pace; ``summary()`` gives the headline
    numbers a stage records as its key metrics (each family adds its own)."""

    steps: int  # optimizer steps of the run (the stopping step when the monitor stopped it)
    resumed_from_step: int  # 0: started from scratch
    final_loss: float = math.nan  # the training loss of the last step
    seconds: float = 0.0  # in the optimizer-step loop (this process, since the resume)
    input_tokens: int = 0  # real (non-padding) input tokens processed in that time
    # what the stage registers; set by the kind's entry point, never part of the summary
    model: PreTrainedModel | None = field(default=None, repr=False, compare=False)
    tokenizer: PreTrainedTokenizerBase | None = field(default=None, repr=False, compare=False)

    @property
    def tokens_per_second(self) -> float:
        return self.input_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, float]:
        shown = {"final_train_loss": self.final_loss, "steps": float(self.steps)}
        if self.resumed_from_step:
            shown["resumed_from_step"] = float(self.resumed_from_step)
        return shown
