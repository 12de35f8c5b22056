"""Episodes of an environment as rows of a completions dataset (book ch.13): the ``sample`` and ``evaluate``
stages' multi-turn path.

Each row is one episode of a prompt row (every column of the prompt row travels with it) and holds:
``completion`` (the model's last message: what reward sources and verifiers score), ``messages`` (the whole
conversation, OpenAI-style, tool calls and tool results included), ``tools`` (the declarations the model
was given), ``turns``, ``outcome`` (done, turn_limit, length, context_limit), ``new_tokens`` (the model's
own tokens) and ``environment_tokens``, the environment's per-episode counts (``tool_calls``,
``invalid_tool_calls``, ...; 0 where an episode reported none) and, when the environment rewards,
``environment_reward``. Such a row is an SFT example as it stands (``messages``, ``tools``), which is how
``rejection_sampling`` keeps successful episodes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.environments.base import Environment
from rlhf_core.rollout.engines.base import RolloutEngine, SamplingRequest
from rlhf_core.rollout.episodes import (
    EpisodeLimits,
    Trajectory,
    TurnDecoder,
    engine_turns,
    native_turns,
    run_episodes,
)

ENVIRONMENT_SOURCE = "environment"  # the name of the environment's reward among a row's scores


class EnvironmentSettings(Protocol):
    """What episode sampling reads of a stage's environment (the spec's ``EnvironmentSpec`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def max_turns(self) -> int: ...
    @property
    def max_context_tokens(self) -> int | None: ...
    def factory(self) -> Callable[[], Environment]: ...


class DecodingSettings(Protocol):
    @property
    def max_new_tokens(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def batch_size(self) -> int: ...


def environment_label(name: str) -> str:
    """How errors name an environment: a built-in's name or the class of a reference."""
    return name.rpartition("/")[2]


def episode_limits(environment: EnvironmentSettings, model: PreTrainedModel) -> EpisodeLimits:
    """The spec's limits; the context limit defaults to the model's maximum sequence length."""
    limit = environment.max_context_tokens or getattr(model.config, "max_position_embeddings", None)
    return EpisodeLimits(environment.max_turns, limit)


def turn_decoder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DecodingSettings,
    engine: RolloutEngine | None,
) -> TurnDecoder:
    """The open ``engine``, or the native in-process loop, as a decoder of assistant turns."""
    if engine is not None:
        request = SamplingRequest(
            cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, tokenizer.eos_token_id
        )
        return engine_turns(engine, request)
    return native_turns(
        model, tokenizer, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, batch_size=cfg.batch_size,
    )  # fmt: skip


def sample_episodes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_rows: list[dict],
    n: int,
    cfg: DecodingSettings,
    environment: EnvironmentSettings,
    seed: int,
    *,
    stage: str,
    engine: RolloutEngine | None = None,
) -> tuple[list[dict], int, float]:
    """``n`` episodes of each prompt row (prompt-major), as completion rows (module docstring); returns
    (rows without scores, the model's generated tokens, seconds)."""
    started = time.perf_counter()
    make = environment.factory()
    indices = [i for i in range(len(prompt_rows)) for _ in range(n)]
    trajectories = run_episodes(
        turn_decoder(model, tokenizer, cfg, engine), tokenizer, [make() for _ in indices], prompt_rows,
        indices, episode_limits(environment, model), seed=seed,
        where=f"stage '{stage}', environment '{environment_label(environment.name)}'",
        max_new_tokens=cfg.max_new_tokens,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    counts = sorted({name for t in trajectories for name in t.metrics})
    rows = [
        episode_row(t, prompt_rows[t.row_index], t.row_index, k % n, counts)
        for k, t in enumerate(trajectories)
    ]
    return rows, sum(t.model_tokens for t in trajectories), seconds


def episode_row(
    trajectory: Trajectory, record: dict, prompt_index: int, completion_index: int, counts: list[str]
) -> dict:
    """One episode as a completions row (module docstring)."""
    t = trajectory
    row = {
        **record,
        "prompt_index": prompt_index,
        "completion_index": completion_index,
        "completion": t.final_answer,
        "messages": t.messages,
        "tools": t.tools,
        "turns": t.turns,
        "outcome": t.outcome,
        "new_tokens": t.model_tokens,
        "environment_tokens": len(t.response_ids) - t.model_tokens,
        **{name: t.metrics.get(name, 0.0) for name in counts},
    }
    if t.environment_reward is not None:
        row["environment_reward"] = t.environment_reward
    return row


def add_environment_rewards(rows: list[dict]) -> list[dict]:
    """Scored rows with the environment's reward added to the composite ``reward`` and kept among the
    ``scores`` (as ``environment``); rows without one are unchanged."""
    out = []
    for row in rows:
        if "environment_reward" in row:
            value = float(row["environment_reward"])
            row = {
                **row,
                "reward": row["reward"] + value,
                "scores": {**row["scores"], ENVIRONMENT_SOURCE: value},
            }
        out.append(row)
    return out


def transcript(messages: list[dict]) -> str:
    """A conversation as readable text: each turn on its own lines, tool calls and tool results shown."""
    lines = []
    for message in messages:
        role, content = message.get("role", "?"), (message.get("content") or "").strip()
        if role == "tool":
            lines.append(f"[tool {message.get('name', '')}] {content}")
            continue
        if content:
            lines.append(f"[{role}] {content}")
        for call in message.get("tool_calls") or []:
            function = call.get("function", {})
            lines.append(f"[{role} calls] {function.get('name')}({function.get('arguments')})")
    return "\n".join(lines)
