"""Train/eval mode of a model, switched for a block and restored after it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode inside the block; every submodule gets back its own mode after it.

    Generation and scoring run inside training loops (rollouts, reward scoring, held-out checks): they
    must not leave dropout switched off for the optimizer steps that follow.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
