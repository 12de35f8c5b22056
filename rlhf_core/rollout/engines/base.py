"""What every rollout engine answers: token ids of n samples per tokenized prompt, with the engine's own
log-probability of each sampled token where it reports one.

Seeds: each prompt gets its own seed, derived from the call's seed and the prompt's position
(:func:`prompt_seeds`), and an engine draws the samples of that prompt from it; so a rollout does not
depend on how an engine batches requests, only on its numerics.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from rlhf_core.errors import UserError


@dataclass(frozen=True)
class SamplingRequest:
    """Decoding settings of one call: T = 0 is greedy; ``top_k`` 0 and ``top_p`` 1 turn those filters off.
    Generation stops after the EOS token (which is kept) or ``max_new_tokens`` tokens."""

    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    eos_token_id: int | None = None


@dataclass
class EngineOutput:
    """Prompt-major completions: the n samples of prompt i at ``i * n .. i * n + n - 1``."""

    token_ids: list[list[int]]  # new tokens, up to and including EOS
    logprobs: list[list[float]] | None = None  # the engine's log pi(token) at T = 1, per new token


class RolloutEngine(Protocol):
    """A decoder of completions that can be handed new policy weights."""

    name: str

    def generate(
        self, prompt_ids: list[list[int]], n: int, request: SamplingRequest, seed: int
    ) -> EngineOutput:
        """``n`` samples of each prompt (token ids, chat template already applied)."""
        ...

    def sync_weights(self, model: Any) -> None:
        """Make the engine decode with ``model``'s current weights (a PeftModel's adapters merged)."""
        ...

    def release_memory(self) -> None:
        """Free what the engine holds on the training device while the policy trains (if it can)."""
        ...

    def close(self) -> None: ...


class EngineError(UserError):
    """The engine could not start, died, or refused a request: the message names the stage and engine."""


def prompt_seeds(seed: int, count: int) -> list[int]:
    """A 31-bit seed per prompt position, a pure function of (seed, position)."""
    out = []
    for position in range(count):
        digest = hashlib.sha256(f"{seed}:{position}".encode()).digest()
        out.append(int.from_bytes(digest[:4], "little") & 0x7FFFFFFF)
    return out
