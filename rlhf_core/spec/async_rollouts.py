"""The ``async_rollouts`` block of a ``policy_gradient`` stage: rollouts generated ahead of the trainer.

Synchronous on-policy RL alternates: the engine generates while the policy waits, the policy trains while
the engine waits. With ``async_rollouts: {max_staleness: K}`` the rollouts of the next K policy versions
may be generated while the policy trains on the current one (as AReaL, prime-rl, NeMo-RL and
open-instruct do), and the loss corrects for the lag with truncated importance weights against the
generating policy's log-probs (book ch.6; ``rlhf_core.training.policy_gradient.async_rollouts``).
"""

from __future__ import annotations

from pydantic import Field

from rlhf_core.spec.base import Strict


class AsyncRolloutsSpec(Strict):
    """Asynchronous rollouts: the next rollouts are generated while the policy trains on the current one,
    by weights at most ``max_staleness`` policy versions old, corrected by truncated importance weights
    against the generating policy's log-probs (book ch.6)."""

    max_staleness: int = Field(
        ge=0,
        le=8,
        description="K: how many policy versions (rollouts' worth of updates) a sample may lag behind the "
        "policy it trains. Generation runs at most K rounds ahead; a sample older than K versions is "
        "dropped and counted. 0: synchronous, the same run as without this block.",
    )


DEFAULT_ASYNC_TIS_CAP = 2.0  # C of min(pi_old / pi_behaviour, C) when asynchronous rollouts name none
