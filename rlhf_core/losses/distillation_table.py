"""The distillation divergences a stage may name and their defaults, declared once.

Torch-free, so the spec can read it when a file is loaded (``rlhf_core.spec`` must not import torch);
``rlhf_core.losses.distillation`` implements the divergences under these names.
"""

from __future__ import annotations

from typing import Literal, get_args

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCE_NAMES: tuple[str, ...] = get_args(Divergence)
DEFAULT_TOP_K = 20  # the book's companion code keeps the teacher's top 20 tokens plus a tail bucket
DEFAULT_JSD_BETA = 0.5  # GKD's symmetric middle
