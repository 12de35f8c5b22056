"""Multi-turn episodes: the model and an environment take turns until the environment says done or a limit
is reached (book ch.13, tool use and function calling).

Many episodes run at once: at every turn the contexts of all episodes still running are decoded in one
call (the native loop or a rollout engine, :data:`TurnDecoder`), each new assistant turn goes to its
episode's environment, and the environment's answer (tool results, a user's reply) is appended to the
context as tokens. The token ids of an episode are built incrementally and never re-tokenized: the model's
own sampled tokens are kept exactly as sampled (``action_mask`` 1: they carry loss, log-probs, KL and
advantages), the environment's messages are rendered by the chat template between the model's end-of-turn
token and the next assistant header (``action_mask`` 0: context, never trained)
(:mod:`rlhf_core.modeling.trajectory_tokens`).

An episode ends when the environment is done, when the model has had ``max_turns`` turns (``turn_limit``:
counted, never an error), when a turn reaches ``max_new_tokens`` without its end-of-turn token
(``length``: the episode cannot go on from half a message) or when the next turn would not fit in
``max_context_tokens`` (``context_limit``; a first context that leaves no room for a turn is an
error naming the row). An environment that raises, or answers with something that
is not a list of messages, fails the stage with a message naming the stage, the environment, the prompt
row and the turn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.environments.base import Environment, EpisodeStart, Message, StepResult
from rlhf_core.errors import UserError
from rlhf_core.modeling.tokenizer import require_tool_support
from rlhf_core.modeling.trajectory_tokens import continuation_ids, prompt_ids
from rlhf_core.rollout.engines.base import RolloutEngine, SamplingRequest
from rlhf_core.rollout.token_scoring import sample_groups

# contexts (token ids, chat template applied) and a seed -> one assistant turn each (new token ids, up to
# and including the end-of-turn token) and the decoder's log-prob of each new token (None: not reported)
TurnDecoder = Callable[[list[list[int]], int], tuple[list[list[int]], list[list[float]] | None]]
Outcome = Literal["done", "turn_limit", "length", "context_limit"]
ENVIRONMENT_ROLES = ("user", "tool", "system")


class EnvironmentFailure(UserError):
    """An environment raised, or answered with something that is not a StepResult of messages."""


@dataclass
class Trajectory:
    """One episode: the first context's tokens, then every token after it, the model's marked in
    ``action_mask``; the conversation as messages; the environment's per-turn rewards."""

    row_index: int
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    action_mask: list[bool] = field(default_factory=list)
    logps: list[float] | None = None  # the decoder's log-probs on the model's tokens, 0.0 elsewhere
    messages: list[Message] = field(default_factory=list)
    tools: list[dict] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    reward_positions: list[int] = field(default_factory=list)  # each turn reward's token: its turn's last
    turns: int = 0  # assistant turns the model wrote
    turn_tokens: list[int] = field(default_factory=list)  # tokens of each of them
    outcome: Outcome = "done"
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def final_answer(self) -> str:
        """The content of the model's last message (what reward sources and verifiers score)."""
        last = next((m for m in reversed(self.messages) if m["role"] == "assistant"), None)
        return (last or {}).get("content") or ""

    @property
    def truncated(self) -> bool:
        """The model's last turn was cut at ``max_new_tokens`` (it never ended its message)."""
        return self.outcome == "length"

    @property
    def environment_reward(self) -> float | None:
        """The sum of the environment's per-turn rewards; None when it gave none."""
        return sum(self.turn_rewards) if self.turn_rewards else None

    @property
    def model_tokens(self) -> int:
        return sum(self.action_mask)


@dataclass(frozen=True)
class EpisodeRecord:
    """What training keeps of an episode besides its tokens: for sample tables and episode metrics."""

    messages: list[Message]
    turns: int
    outcome: Outcome
    metrics: dict[str, float]
    environment_reward: float | None
    turn_rewards: tuple[tuple[int, float], ...] = ()  # (response position, reward) of each turn reward

    @staticmethod
    def of(trajectory: Trajectory) -> EpisodeRecord:
        t = trajectory
        placed = tuple(zip(t.reward_positions, t.turn_rewards, strict=True))
        return EpisodeRecord(t.messages, t.turns, t.outcome, dict(t.metrics), t.environment_reward, placed)


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int  # assistant turns per episode
    max_context_tokens: int | None = None  # prompt + response tokens an episode may reach


def native_turns(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    batch_size: int,
) -> TurnDecoder:
    """A :data:`TurnDecoder` on the in-process decoding loop (no log-probs: the trainer scores them)."""

    def decode(contexts: list[list[int]], seed: int) -> tuple[list[list[int]], None]:
        turns = sample_groups(
            policy, tokenizer, contexts, 1, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, batch_size=batch_size, seed=seed, top_k=top_k,
        )  # fmt: skip
        return turns, None

    return decode


def engine_turns(engine: RolloutEngine, request: SamplingRequest) -> TurnDecoder:
    """A :data:`TurnDecoder` on an open rollout engine (vLLM, the background native engine): one request
    for every running episode, so the engine keeps them all in flight."""

    def decode(contexts: list[list[int]], seed: int) -> tuple[list[list[int]], list[list[float]] | None]:
        out = engine.generate(contexts, 1, request, seed)
        return out.token_ids, out.logprobs

    return decode


def turn_seed(seed: int, turn: int) -> int:
    """The decoding seed of turn ``turn`` of a batch of episodes started with ``seed``."""
    digest = hashlib.sha256(f"episodes:{seed}:{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def run_episodes(
    decode: TurnDecoder,
    tokenizer: PreTrainedTokenizerBase,
    environments: list[Environment],
    rows: list[dict],
    row_indices: list[int],
    limits: EpisodeLimits,
    *,
    seed: int,
    where: str,
    max_new_tokens: int,
) -> list[Trajectory]:
    """One episode per environment, of prompt row ``rows[row_indices[k]]`` for ``environments[k]``, all run
    turn by turn together. ``where`` names the stage and environment in errors ("stage 'grpo', environment
    'tools'")."""
    eos = tokenizer.eos_token_id
    episodes: list[Trajectory] = []
    for env, index in zip(environments, row_indices, strict=True):
        start = _call(where, index, 0, "reset", lambda env=env, index=index: env.reset(rows[index]))
        if not isinstance(start, EpisodeStart):
            raise EnvironmentFailure(
                f"{where}: reset (prompt row {index}) returned {start!r}, not an EpisodeStart"
            )
        if start.tools and (not episodes or not episodes[-1].tools):
            require_tool_support(tokenizer, where)  # once (the tools usually are the same every episode)
        ids = prompt_ids(tokenizer, start.messages, start.tools)
        episodes.append(Trajectory(index, ids, messages=list(start.messages), tools=list(start.tools)))
    for episode in episodes:
        if not _fits(episode, max_new_tokens, limits):
            raise UserError(
                f"{where}: prompt row {episode.row_index}: the first context (system turn, tools and "
                f"prompt) is {len(episode.prompt_ids)} tokens, so a turn of max_new_tokens {max_new_tokens} "
                f"would pass the context limit of {limits.max_context_tokens} tokens "
                "(environment.max_context_tokens, else the model's maximum sequence length); shorten the "
                "prompt or the tool declarations, or lower max_new_tokens"
            )
    running = list(range(len(episodes)))
    for turn in range(limits.max_turns):
        fits = [k for k in running if _fits(episodes[k], max_new_tokens, limits)]
        for k in set(running) - set(fits):
            episodes[k].outcome = "context_limit"
        running = fits
        if not running:
            break
        contexts = [episodes[k].prompt_ids + episodes[k].response_ids for k in running]
        new_tokens, logps = decode(contexts, turn_seed(seed, turn))
        still = []
        for position, k in enumerate(running):
            episode, tokens = episodes[k], new_tokens[position]
            _add_tokens(episode, tokens, None if logps is None else logps[position], model=True)
            episode.turns += 1
            episode.turn_tokens.append(len(tokens))
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            if not tokens or tokens[-1] != eos:
                episode.messages.append({"role": "assistant", "content": text})
                episode.outcome = "length"
                continue
            env = environments[k]
            result = _call(
                where,
                episode.row_index,
                turn,
                "step",
                lambda env=env, text=text: env.step({"role": "assistant", "content": text}),
            )
            _check_step(result, where, episode.row_index, turn)
            context = list(episode.messages)
            episode.messages.append(result.assistant or {"role": "assistant", "content": text})
            if result.reward is not None:
                episode.turn_rewards.append(float(result.reward))
                episode.reward_positions.append(len(episode.response_ids) - 1)
            for name, value in result.metrics.items():
                episode.metrics[name] = episode.metrics.get(name, 0.0) + float(value)
            if result.done:
                episode.outcome = "done"
                continue
            if turn == limits.max_turns - 1:
                episode.outcome = "turn_limit"  # its answer to the last turn is never seen by the model
                continue
            following = continuation_ids(tokenizer, context, text, result.messages, episode.tools)
            _add_tokens(episode, following, None if logps is None else [0.0] * len(following), model=False)
            episode.messages += result.messages
            still.append(k)
        running = still
    for k in running:
        episodes[k].outcome = "turn_limit"
    return episodes


def _fits(episode: Trajectory, max_new_tokens: int, limits: EpisodeLimits) -> bool:
    if limits.max_context_tokens is None:
        return True
    used = len(episode.prompt_ids) + len(episode.response_ids)
    return used + max_new_tokens <= limits.max_context_tokens


def _add_tokens(episode: Trajectory, tokens: list[int], logps: list[float] | None, *, model: bool) -> None:
    episode.response_ids += tokens
    episode.action_mask += [model] * len(tokens)
    if logps is not None:
        episode.logps = (episode.logps or [0.0] * (len(episode.response_ids) - len(tokens))) + list(logps)


def _call(where: str, row: int, turn: int, what: str, fn: Callable[[], object]) -> object:
    try:
        return fn()
    except UserError as exc:  # e.g. a verifier that finds no reference answer in the row
        raise UserError(f"{where}: {what} at prompt row {row}, turn {turn + 1}: {exc}") from exc
    except Exception as exc:
        raise EnvironmentFailure(
            f"{where}: {what} raised at prompt row {row}, turn {turn + 1}: {type(exc).__name__}: {exc}"
        ) from exc


def _check_step(result: object, where: str, row: int, turn: int) -> None:
    at = f"{where}: step at prompt row {row}, turn {turn + 1}"
    if not isinstance(result, StepResult):
        raise EnvironmentFailure(f"{at} returned {type(result).__name__}, expected a StepResult")
    if not isinstance(result.messages, list):
        raise EnvironmentFailure(
            f"{at}: StepResult.messages is {type(result.messages).__name__}, expected a list"
        )
    for i, message in enumerate(result.messages):
        if not isinstance(message, dict) or message.get("role") not in ENVIRONMENT_ROLES:
            raise EnvironmentFailure(
                f"{at}: StepResult.messages[{i}] must be a dict with a role in {list(ENVIRONMENT_ROLES)} "
                f"(the model writes the assistant turns), got {message!r}"
            )
        if not isinstance(message.get("content"), str):
            raise EnvironmentFailure(f"{at}: StepResult.messages[{i}].content must be a string")
    if not result.done and not result.messages:
        raise EnvironmentFailure(f"{at}: not done but no messages for the model to answer")
