"""Multi-turn episodes (book ch.13): the orchestrator's tokens and masks, limits, errors, and the built-in
conversation environments.

A scripted decoder (a plain function returning fixed turns) stands in for the model where a test needs to
know what the model says; the native loop on a tiny model checks the real path.
"""

from __future__ import annotations

import pytest

from rlhf_core.environments.base import EpisodeStart, StepResult
from rlhf_core.environments.conversation import UserSimulator, VerifierFeedback
from rlhf_core.environments.tool_environment import ToolEnvironment
from rlhf_core.errors import UserError
from rlhf_core.modeling.models import build_tiny_model
from rlhf_core.modeling.trajectory_tokens import conversation_tokens
from rlhf_core.rollout.episodes import EpisodeLimits, native_turns, run_episodes
from rlhf_core.spec.models import TinyModelSource

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "123 * 45"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=400), seed=0)


def scripted(tokenizer, turns_by_episode: list[list[str]], eos: bool = True):
    """A decoder that makes episode k say ``turns_by_episode[k][t]`` at its turn t (the EOS appended)."""
    said = [0] * len(turns_by_episode)
    contexts_seen: list[list[int]] = []

    def decode(contexts, seed):
        out = []
        for context in contexts:
            contexts_seen.append(context)
        # episodes still running keep their order: match them by their first (prompt) tokens' position
        for k in _running(said, turns_by_episode)[: len(contexts)]:
            text = turns_by_episode[k][said[k]]
            said[k] += 1
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(ids + ([tokenizer.eos_token_id] if eos else []))
        return out, None

    return decode


def _running(said, turns):
    return [k for k in range(len(turns)) if said[k] < len(turns[k])]


def test_a_tool_episode_tokens_equal_the_written_trajectory_and_only_the_model_tokens_are_masked(tiny):
    _, tokenizer = tiny
    rows = [{"prompt": "What is 123 * 45?", "answer": "5535"}]
    env = ToolEnvironment(tools=["calculator"])
    decode = scripted(tokenizer, [[CALL, "The answer is 5535."]])
    (episode,) = run_episodes(
        decode, tokenizer, [env], rows, [0], EpisodeLimits(4), seed=0, where="stage 's'", max_new_tokens=64
    )
    assert episode.outcome == "done" and episode.turns == 2
    assert episode.final_answer == "The answer is 5535."
    assert [m["role"] for m in episode.messages] == ["user", "assistant", "tool", "assistant"]
    assert episode.messages[2]["content"] == "5535"
    assert episode.metrics["valid_tool_calls"] == 1.0
    # the episode's tokens are the conversation rendered by the template, model turns masked in
    ids, mask = conversation_tokens(tokenizer, episode.messages, episode.tools, max_length=10_000)
    tokens = episode.prompt_ids + episode.response_ids
    assert tokens == ids[: len(tokens)]
    assert [False] * len(episode.prompt_ids) + episode.action_mask == [bool(m) for m in mask[: len(tokens)]]
    own = [t for t, m in zip(episode.response_ids, episode.action_mask, strict=True) if m]
    assert tokenizer.decode(own) == f"{CALL}<|im_end|>The answer is 5535.<|im_end|>"
    theirs = [t for t, m in zip(episode.response_ids, episode.action_mask, strict=True) if not m]
    assert "5535" in tokenizer.decode(theirs)


def test_turn_limit_length_and_context_limit_end_episodes_and_are_counted(tiny):
    _, tokenizer = tiny
    rows = [{"prompt": "What is 2 + 2?", "answer": "4"}]
    never_done = scripted(tokenizer, [[CALL] * 5])
    (episode,) = run_episodes(
        never_done, tokenizer, [ToolEnvironment(tools=["calculator"], max_calls=10)], rows, [0],
        EpisodeLimits(3), seed=0, where="s", max_new_tokens=64,
    )  # fmt: skip
    assert episode.outcome == "turn_limit" and episode.turns == 3
    assert episode.action_mask[-1]  # ends with the model's own last turn (its tool's answer never shown)
    cut = scripted(tokenizer, [["a long answer"]], eos=False)
    (episode,) = run_episodes(
        cut, tokenizer, [ToolEnvironment(tools=["calculator"])], rows, [0], EpisodeLimits(3), seed=0,
        where="s", max_new_tokens=64,
    )  # fmt: skip
    assert episode.outcome == "length" and episode.truncated
    tight = scripted(tokenizer, [[CALL, CALL]])
    (episode,) = run_episodes(
        tight, tokenizer, [ToolEnvironment(tools=["calculator"])], rows, [0],
        EpisodeLimits(3, max_context_tokens=len(episode.prompt_ids) + 70), seed=0, where="s",
        max_new_tokens=64,
    )  # fmt: skip
    assert episode.outcome == "context_limit" and episode.turns == 1


class Raising:
    def reset(self, row):
        return EpisodeStart([{"role": "user", "content": row["prompt"]}])

    def step(self, assistant):
        raise RuntimeError("the simulator lost its connection")


class AnswersAsAssistant:
    def reset(self, row):
        return EpisodeStart([{"role": "user", "content": row["prompt"]}])

    def step(self, assistant):
        return StepResult([{"role": "assistant", "content": "I answer for the model"}])


def test_an_environment_that_raises_or_misbehaves_fails_naming_stage_environment_row_and_turn(tiny):
    _, tokenizer = tiny
    rows = [{"prompt": "hello"}, {"prompt": "again"}]
    decode = scripted(tokenizer, [["hi"], ["hi"]])
    where = "stage 'grpo', environment 'envs.py:Raising'"
    with pytest.raises(UserError, match=r"stage 'grpo', environment 'envs.py:Raising': step raised at prompt "
                       r"row 0, turn 1: RuntimeError: the simulator lost its connection"):  # fmt: skip
        run_episodes(decode, tokenizer, [Raising(), Raising()], rows, [0, 1], EpisodeLimits(2), seed=0,
                     where=where, max_new_tokens=8)  # fmt: skip
    with pytest.raises(
        UserError, match=r"messages\[0\] must be a dict with a role in \['user', 'tool', 'system'\]"
    ):
        run_episodes(scripted(tokenizer, [["hi"]]), tokenizer, [AnswersAsAssistant()], rows, [0],
                     EpisodeLimits(2), seed=0, where="s", max_new_tokens=8)  # fmt: skip


def test_verifier_feedback_says_try_again_until_right_and_penalises_extra_attempts():
    env = VerifierFeedback(verifier="arithmetic_exact", max_attempts=3, attempt_penalty=0.1)
    start = env.reset({"prompt": "What is 2 + 3?", "answer": "5"})
    assert start.messages == [{"role": "user", "content": "What is 2 + 3?"}]
    wrong = env.step({"role": "assistant", "content": "The answer is 6."})
    assert (
        not wrong.done and wrong.messages[0]["role"] == "user" and "try again" in wrong.messages[0]["content"]
    )
    right = env.step({"role": "assistant", "content": "The answer is 5."})
    assert right.done and right.reward == pytest.approx(0.9)
    env.reset({"prompt": "What is 2 + 3?", "answer": "5"})
    for _ in range(2):
        assert not env.step({"role": "assistant", "content": "7"}).done
    last = env.step({"role": "assistant", "content": "7"})
    assert last.done and last.reward == pytest.approx(-0.2)


def test_user_simulator_asks_the_rows_followups_then_ends():
    env = UserSimulator()
    env.reset(
        {"prompt": "Name a prime.", "followups": ["Another one?", {"role": "user", "content": "Bigger?"}]}
    )
    first = env.step({"role": "assistant", "content": "2"})
    second = env.step({"role": "assistant", "content": "3"})
    assert [first.messages[0]["content"], second.messages[0]["content"]] == ["Another one?", "Bigger?"]
    assert env.step({"role": "assistant", "content": "11"}).done


def test_native_turns_run_many_episodes_with_consistent_tokens(tiny):
    model, tokenizer = tiny
    rows = [{"prompt": f"What is {a} * 7?", "answer": str(7 * a)} for a in (11, 12, 13)]
    decode = native_turns(
        model, tokenizer, max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, batch_size=8
    )
    envs = [VerifierFeedback(verifier="arithmetic_exact", max_attempts=2) for _ in range(6)]
    first = run_episodes(
        decode,
        tokenizer,
        envs,
        rows,
        [0, 0, 1, 1, 2, 2],
        EpisodeLimits(2),
        seed=3,
        where="s",
        max_new_tokens=12,
    )
    again = run_episodes(
        decode, tokenizer, [VerifierFeedback(verifier="arithmetic_exact", max_attempts=2) for _ in range(6)],
        rows, [0, 0, 1, 1, 2, 2], EpisodeLimits(2), seed=3, where="s", max_new_tokens=12,
    )  # fmt: skip
    assert [e.response_ids for e in first] == [e.response_ids for e in again]  # seeded
    for episode in first:
        assert len(episode.response_ids) == len(episode.action_mask)
        assert sum(episode.turn_tokens) == episode.model_tokens
        assert episode.outcome in ("done", "turn_limit", "length")


def test_a_first_context_without_room_for_a_turn_is_an_error_naming_the_row(tiny):
    _, tokenizer = tiny
    rows = [{"prompt": "What is 2 + 2?"}, {"prompt": "What is " + "1 + " * 400 + "1?"}]
    with pytest.raises(UserError, match=r"stage 's': prompt row 1: the first context .* is \d+ tokens"):
        environments = [ToolEnvironment(tools=["calculator"]) for _ in rows]
        limits = EpisodeLimits(2, max_context_tokens=900)
        decode = scripted(tokenizer, [["4"], ["201"]])
        run_episodes(
            decode,
            tokenizer,
            environments,
            rows,
            [0, 1],
            limits,
            seed=0,
            where="stage 's'",
            max_new_tokens=32,
        )
