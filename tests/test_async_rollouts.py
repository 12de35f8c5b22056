"""The asynchronous rollout producer: the staleness gate, the weights each round was sampled with, and the
overlap it buys.

Ordering, gate and timing properties use ``RecordingEngine``, a test double of the RolloutEngine protocol
that records every call in a timeline and sleeps in ``generate`` (only there can a test control how long
a round takes). Exactness and versions use the real NativeProcessEngine on a tiny model: with K = 0 the
producer gives exactly what synchronous sync-then-generate calls give; with K = 1 each round is exactly
what the weights of its recorded version sample in-process.
"""

from __future__ import annotations

import copy
import os
import signal
import time

import pytest
import torch

from rlhf_core.errors import UserError
from rlhf_core.modeling.models import build_tiny_model
from rlhf_core.rollout.engines.base import EngineError, EngineOutput, SamplingRequest
from rlhf_core.rollout.engines.native_process import NativeProcessEngine
from rlhf_core.rollout.token_scoring import encode_prompts, sample_groups
from rlhf_core.spec import TinyModelSource
from rlhf_core.training.policy_gradient.async_rollouts import (
    AsyncRolloutProducer,
    RoundRequest,
    is_stale,
    staleness_counts,
)

WHAT = "stage 'policy'"
REQUEST = SamplingRequest(max_new_tokens=8, temperature=1.0)


class RecordingEngine:
    """Records ("sync", weights), ("start", round) and ("end", round) in ``timeline`` and which weights
    generated each round in ``generated_with``; ``generate`` sleeps ``delay_s`` and raises ``error`` on
    round ``fail_round`` (the round is the request's seed)."""

    name = "recording"

    def __init__(self, timeline: list, delay_s: float = 0.0, fail_round: int | None = None, error=None):
        self.timeline, self.delay_s = timeline, delay_s
        self.fail_round, self.error = fail_round, error
        self.weights = None
        self.generated_with: dict[int, object] = {}
        self.generating = False
        self.syncs_during_generate = 0

    def generate(self, prompt_ids, n, request, seed):
        self.generating = True
        self.timeline.append(("start", seed))
        time.sleep(self.delay_s)
        self.generating = False
        if seed == self.fail_round:
            raise self.error
        self.timeline.append(("end", seed))
        self.generated_with[seed] = self.weights
        return EngineOutput([[seed]], [[-1.0]])

    def sync_weights(self, model):
        self.syncs_during_generate += self.generating
        self.timeline.append(("sync", model))
        self.weights = model

    def release_memory(self):
        pass

    def close(self):
        pass


def plan_by_seed(j: int) -> RoundRequest:
    """Round j: one prompt, seed j (the recording engine reports the round as its seed)."""
    return RoundRequest([[j]], 1, REQUEST, seed=j)


def _producer(engine, k: int, **kwargs) -> AsyncRolloutProducer:
    return AsyncRolloutProducer(engine, plan_by_seed, max_staleness=k, what=WHAT, **kwargs)


def test_with_k0_a_round_starts_only_when_the_trainer_asks_for_it():
    timeline: list = []
    engine = RecordingEngine(timeline)
    with _producer(engine, 0) as producer:
        producer.publish(0, "w0")
        time.sleep(0.2)
        assert timeline == []  # published, but round 0 is not asked for yet
        first = producer.take(0, timeout_s=5)
        time.sleep(0.2)
        assert timeline == [("sync", "w0"), ("start", 0), ("end", 0)]  # nothing ahead
        producer.publish(1, "w1")
        second = producer.take(1, timeout_s=5)
    assert timeline[3:] == [("sync", "w1"), ("start", 1), ("end", 1)]
    assert (first.round, first.version, first.output.token_ids) == (0, 0, [[0]])
    assert (second.round, second.version, second.output.token_ids) == (1, 1, [[1]])
    assert engine.generated_with == {0: "w0", 1: "w1"}


def _train(producer, timeline, rounds: int, train_s: float) -> list:
    """A trainer: ask for round j, take it, train (sleep), publish the weights version j + 1."""
    taken = []
    producer.publish(0, "w0")
    for j in range(rounds):
        timeline.append(("ask", j))
        taken.append(producer.take(j, timeout_s=10))
        time.sleep(train_s)
        producer.publish(j + 1, f"w{j + 1}")
    return taken


def test_with_k1_the_producer_runs_exactly_one_round_ahead():
    timeline: list = []
    engine = RecordingEngine(timeline, delay_s=0.02)
    with _producer(engine, 1) as producer:
        taken = _train(producer, timeline, rounds=5, train_s=0.3)
    at = {event: i for i, event in enumerate(timeline)}
    for j in range(1, 5):
        assert at[("ask", j - 1)] < at[("start", j)] < at[("ask", j)]  # started ahead, not earlier
    assert ("start", 6) not in at  # round 6 would need the trainer to ask for round 5
    assert at[("start", 5)] > at[("ask", 4)]
    # round j >= 1 started while the trainer trained on round j - 1, on the weights of version j - 1
    assert [r.version for r in taken] == [0, 0, 1, 2, 3]
    assert [engine.generated_with[r.round] for r in taken] == ["w0", "w0", "w1", "w2", "w3"]
    # the trainer consumes round j at version j: every round but the first is one version behind
    assert [staleness_counts([r.version], consumer_version=r.round) for r in taken] == [{0: 1}] + [{1: 1}] * 4
    assert not any(is_stale(r.version, r.round, max_staleness=1) for r in taken)
    assert all(is_stale(r.version, r.round, max_staleness=0) for r in taken[1:])


def test_syncs_happen_between_generates_only_and_the_newest_snapshot_wins():
    timeline: list = []
    engine = RecordingEngine(timeline, delay_s=0.3)
    with _producer(engine, 1) as producer:
        producer.publish(0, "w0")
        time.sleep(0.1)  # round 0 is generating
        for version in (1, 2, 3):
            producer.publish(version, f"w{version}")
        first, second = producer.take(0, timeout_s=5), producer.take(1, timeout_s=5)
    assert engine.syncs_during_generate == 0
    assert timeline[:6] == [
        ("sync", "w0"),
        ("start", 0),
        ("end", 0),
        ("sync", "w3"),
        ("start", 1),
        ("end", 1),
    ]
    assert (first.version, second.version, producer.syncs) == (0, 3, 2)


def test_a_newer_snapshot_published_before_the_first_round_replaces_the_older_ones():
    timeline: list = []
    engine = RecordingEngine(timeline)
    with _producer(engine, 0) as producer:
        for version, weights in enumerate(["a", "b", "c"]):
            producer.publish(version, weights)
        taken = producer.take(0, timeout_s=5)
    assert timeline == [("sync", "c"), ("start", 0), ("end", 0)]
    assert (taken.version, producer.syncs) == (2, 1)


@pytest.mark.parametrize("error", [EngineError("stage 'policy': engine died"), UserError("bad reward")])
def test_an_engine_exception_reaches_take_unchanged(error):
    engine = RecordingEngine([], fail_round=1, error=error)
    with _producer(engine, 1) as producer:
        producer.publish(0, "w0")
        assert producer.take(0, timeout_s=5).round == 0
        for _ in range(2):  # and again: the producer stays failed
            with pytest.raises(type(error)) as raised:
                producer.take(1, timeout_s=5)
            assert raised.value is error


def test_an_exception_of_the_plan_reaches_take():
    def plan(j: int) -> RoundRequest:
        raise UserError(f"round {j}: no prompts left")

    with AsyncRolloutProducer(RecordingEngine([]), plan, max_staleness=0, what=WHAT) as producer:
        producer.publish(0, "w0")
        with pytest.raises(UserError, match="round 0: no prompts left"):
            producer.take(0, timeout_s=5)


def test_close_while_a_round_is_in_flight_returns_within_the_join_timeout():
    engine = RecordingEngine([], delay_s=3.0)
    producer = _producer(engine, 1, join_timeout_s=0.3).__enter__()
    producer.publish(0, "w0")
    time.sleep(0.1)
    assert engine.generating
    started = time.monotonic()
    producer.close()
    assert time.monotonic() - started < 1.0
    with pytest.raises(EngineError, match="closed before round 0"):
        producer.take(0, timeout_s=5)


def test_rounds_are_taken_in_order():
    with _producer(RecordingEngine([]), 1) as producer:
        producer.publish(0, "w0")
        with pytest.raises(ValueError, match="expected round 0, got 1"):
            producer.take(1)
        producer.take(0, timeout_s=5)
        with pytest.raises(ValueError, match="expected round 1, got 0"):
            producer.take(0)


def test_a_round_that_does_not_come_in_time_is_an_engine_error():
    with _producer(RecordingEngine([]), 0) as producer:  # no version published: nothing can start
        started = time.monotonic()
        with pytest.raises(EngineError, match=r"stage 'policy'.*round 0 was not generated in 0.2 s"):
            producer.take(0, timeout_s=0.2)
        assert 0.2 <= time.monotonic() - started < 2


def test_one_round_ahead_overlaps_generation_with_training():
    """6 rounds of 0.2 s generation and 0.2 s training: ~2.4 s in lockstep, ~1.4 s one round ahead."""
    walls, producers = {}, {}
    for k in (0, 1):
        timeline: list = []
        started = time.monotonic()
        with _producer(RecordingEngine(timeline, delay_s=0.2), k) as producer:
            taken = _train(producer, timeline, rounds=6, train_s=0.2)
        walls[k], producers[k] = time.monotonic() - started, producer
    assert walls[1] / walls[0] < 0.8, walls
    for producer in producers.values():
        assert producer.engine_busy_s >= 6 * 0.2
    # in lockstep the engine idles while the trainer trains and the trainer waits for every round
    assert producers[0].engine_idle_s >= 5 * 0.2 * 0.9
    assert sum(r.wait_s for r in taken) < 0.2 * 3  # one round ahead: the trainer hardly waits


def test_a_negative_staleness_bound_is_a_user_error():
    with pytest.raises(UserError, match=r"stage 'policy': max_staleness must be 0 or more .* got -1"):
        _producer(RecordingEngine([]), -1)


def test_staleness_helpers():
    assert staleness_counts([3, 3, 2, 5], consumer_version=5) == {0: 1, 2: 2, 3: 1}
    assert not is_stale(4, 5, max_staleness=1)
    assert is_stale(3, 5, max_staleness=1)
    assert not is_stale(5, 5, max_staleness=0)


# --- with the real engine in a worker process ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(one_torch_thread):
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=64, heads=2, layers=2), seed=0)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def versions(tiny) -> list:
    """Weights of versions 0..4: the tiny model, perturbed more at each version (as training would)."""
    model, _ = tiny
    out, generator = [model], torch.Generator().manual_seed(0)
    for _ in range(4):
        nxt = copy.deepcopy(out[-1])
        with torch.no_grad():
            for p in nxt.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        out.append(nxt)
    return out


@pytest.fixture(scope="module")
def native(tiny):
    model, tokenizer = tiny
    with NativeProcessEngine(copy.deepcopy(model), tokenizer, what=WHAT, batch_size=4) as engine:
        yield engine


def _native_plan(tokenizer):
    ids = encode_prompts(tokenizer, [f"What is {a} + {a + 1}?" for a in range(8)])
    request = SamplingRequest(10, 1.0, eos_token_id=tokenizer.eos_token_id)
    return lambda j: RoundRequest(ids[2 * j : 2 * j + 2], 2, request, seed=100 + j)


def test_lockstep_gives_exactly_synchronous_generate_after_sync(native, tiny, versions):
    plan = _native_plan(tiny[1])
    with AsyncRolloutProducer(native, plan, max_staleness=0, what=WHAT) as producer:
        taken = []
        for j in range(3):
            producer.publish(j, versions[j])
            taken.append(producer.take(j, timeout_s=60))
    for j, got in enumerate(taken):
        native.sync_weights(versions[j])
        wanted = plan(j)
        expected = native.generate(wanted.prompt_ids, wanted.n, wanted.request, wanted.seed)
        assert (got.version, got.output.token_ids, got.output.logprobs) == (
            j,
            expected.token_ids,
            expected.logprobs,
        )


def test_one_round_ahead_each_round_is_what_its_version_samples(native, tiny, versions):
    model, tokenizer = tiny
    plan = _native_plan(tokenizer)
    with AsyncRolloutProducer(native, plan, max_staleness=1, what=WHAT) as producer:
        producer.publish(0, versions[0])
        taken = []
        for j in range(4):
            taken.append(producer.take(j, timeout_s=60))
            producer.publish(j + 1, versions[j + 1])  # the weights after training on round j
    for j, got in enumerate(taken):
        assert got.version in (j - 1, j) and got.version >= 0
        wanted = plan(j)
        expected = sample_groups(
            versions[got.version], tokenizer, wanted.prompt_ids, wanted.n, max_new_tokens=10,
            temperature=1.0, top_p=1.0, batch_size=4, seed=wanted.seed,
        )  # fmt: skip
        assert got.output.token_ids == expected
    assert producer.syncs <= 4 and producer.engine_busy_s > 0


def test_a_killed_worker_reaches_take_as_an_engine_error(tiny):
    model, tokenizer = tiny
    with NativeProcessEngine(model, tokenizer, what=WHAT) as engine:
        plan = _native_plan(tokenizer)
        with AsyncRolloutProducer(engine, plan, max_staleness=1, what=WHAT) as producer:
            os.kill(engine.pid, signal.SIGKILL)
            producer.publish(0, model)
            started = time.monotonic()
            with pytest.raises(EngineError, match=r"stage 'policy'.*native_process.*died"):
                producer.take(0, timeout_s=30)
            assert time.monotonic() - started < 5
    assert not producer._thread.is_alive()
