"""The native decoding loop in a worker process against the same loop in-process, with a real worker.

What must hold: the worker samples exactly what ``sample_groups`` samples for the same weights, prompts,
settings, seed and batch size (T = 1 and greedy); its log-probs are an in-process scoring pass's; after a
weight sync it follows the new weights (a LoRA policy's adapters merged), and a sync racing a generate
never mixes the two sets; a worker that dies or fails is an EngineError naming the stage and engine,
quickly; no worker outlives close() or its parent.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from rlhf_core.modeling.completion_scoring import can_share_prefix
from rlhf_core.modeling.models import build_tiny_model
from rlhf_core.rollout.engines.base import EngineError, SamplingRequest
from rlhf_core.rollout.engines.native_process import NativeProcessEngine
from rlhf_core.rollout.engines.weight_export import plain_state_dict
from rlhf_core.rollout.token_scoring import encode_prompts, sample_groups, score_tokens
from rlhf_core.spec import TinyModelSource

ROOT = Path(__file__).resolve().parents[1]
WHAT = "stage 'policy'"
BATCH = 4  # sequences per decoding batch: several batches per call
PROMPTS = [f"What is {a} + {b}?" for a, b in [(1, 2), (3, 4), (5, 9), (2, 2), (7, 1)]]


@pytest.fixture(scope="module")
def tiny(one_torch_thread):
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=64, heads=2, layers=2), seed=0)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def started(tiny):
    model, tokenizer = tiny
    with NativeProcessEngine(copy.deepcopy(model), tokenizer, what=WHAT, batch_size=BATCH) as engine:
        yield engine


@pytest.fixture
def engine(started, tiny):
    """The module's engine holding the tiny model's own weights at the start of each test."""
    started.sync_weights(tiny[0])
    return started


def _request(tokenizer, temperature: float, max_new_tokens: int = 12) -> SamplingRequest:
    return SamplingRequest(max_new_tokens, temperature, eos_token_id=tokenizer.eos_token_id)


def _in_process(model, tokenizer, ids, n, temperature, seed, max_new_tokens=12):
    return sample_groups(
        model, tokenizer, ids, n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0,
        batch_size=BATCH, seed=seed,
    )  # fmt: skip


def _perturbed(model, scale: float = 0.05, seed: int = 1):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return other


@pytest.mark.parametrize("temperature", [1.0, 0.0], ids=["sampled", "greedy"])
def test_tokens_equal_in_process_sample_groups(engine, tiny, temperature):
    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS)
    out = engine.generate(ids, 3, _request(tokenizer, temperature), seed=7)
    assert out.token_ids == _in_process(model, tokenizer, ids, 3, temperature, seed=7)
    assert len(out.token_ids) == 3 * len(PROMPTS)
    if temperature > 0:  # the seed is used: another one samples other tokens
        assert engine.generate(ids, 3, _request(tokenizer, temperature), seed=8).token_ids != out.token_ids


def test_logprobs_equal_an_in_process_scoring_pass(engine, tiny):
    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS)
    n = 2
    out = engine.generate(ids, n, _request(tokenizer, 1.0), seed=3)
    rows = [ids[k // n] for k in range(len(out.token_ids))]
    groups = [k // n for k in range(len(out.token_ids))]
    expected, *_ = score_tokens(
        model, None, None, rows, out.token_ids, groups, tokenizer.pad_token_id, can_share_prefix(model), 16
    )
    assert [len(lp) for lp in out.logprobs] == [len(c) for c in out.token_ids]
    for i, logprobs in enumerate(out.logprobs):
        torch.testing.assert_close(torch.tensor(logprobs), expected[i, : len(logprobs)], atol=1e-5, rtol=0)
    assert all(lp < 0 for row in out.logprobs for lp in row)


def test_after_a_sync_the_worker_samples_with_the_new_weights(engine, tiny):
    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS)
    other = _perturbed(model)
    before = engine.generate(ids, 2, _request(tokenizer, 1.0), seed=5).token_ids
    engine.sync_weights(other)
    after = engine.generate(ids, 2, _request(tokenizer, 1.0), seed=5).token_ids
    assert after == _in_process(other, tokenizer, ids, 2, 1.0, seed=5)
    assert after != before
    assert engine.last_sync_s > 0


def test_a_plain_state_dict_syncs_like_its_model(engine, tiny):
    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS)
    other = _perturbed(model, seed=3)
    engine.sync_weights(plain_state_dict(other))
    out = engine.generate(ids, 2, _request(tokenizer, 1.0), seed=5).token_ids
    assert out == _in_process(other, tokenizer, ids, 2, 1.0, seed=5)


def test_a_lora_policy_is_synced_with_its_adapters_merged(engine, tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter): give it weights
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    engine.sync_weights(peft_model)
    out = engine.generate(ids, 1, _request(tokenizer, 0.0), seed=0).token_ids
    assert out == _in_process(merged, tokenizer, ids, 1, 0.0, seed=0)
    assert out != _in_process(model, tokenizer, ids, 1, 0.0, seed=0)
    assert not any("lora" in name for name in engine._weights)


def test_a_sync_during_a_generate_never_mixes_two_sets_of_weights(engine, tiny):
    """The generate in flight finishes with one set entirely: the version it reports names which, and
    its tokens are that set's in-process tokens."""
    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS * 4)
    other = _perturbed(model, seed=2)
    expected = {
        engine.syncs: _in_process(model, tokenizer, ids, 2, 1.0, seed=11, max_new_tokens=24),
        engine.syncs + 1: _in_process(other, tokenizer, ids, 2, 1.0, seed=11, max_new_tokens=24),
    }
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(out=engine.generate(ids, 2, _request(tokenizer, 1.0, 24), seed=11))
    )
    thread.start()
    time.sleep(0.05)  # usually while the worker decodes
    engine.sync_weights(other)
    thread.join(timeout=60)
    assert result["out"].token_ids == expected[engine.generated_version]


def test_an_exception_in_the_worker_is_reported_with_its_message(engine, tiny):
    _, tokenizer = tiny
    out_of_vocabulary = [[len(tokenizer) + 1000]]
    with pytest.raises(EngineError, match=r"stage 'policy'.*native_process.*IndexError.*index out of range"):
        engine.generate(out_of_vocabulary, 1, _request(tokenizer, 0.0), seed=0)
    ids = encode_prompts(tokenizer, PROMPTS[:1])
    assert engine.generate(ids, 1, _request(tokenizer, 0.0), seed=0).token_ids  # the worker stayed up


def test_a_sync_of_another_architecture_is_refused(engine, tiny):
    other, _ = build_tiny_model(TinyModelSource(hidden_size=32, heads=2, layers=1), seed=0)
    with pytest.raises(EngineError, match="other tensors than the policy"):
        engine.sync_weights(other)


def _running(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _wait_gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _running(pid)


def test_a_worker_killed_during_a_generate_is_an_engine_error_within_seconds(tiny):
    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS * 8)
    killed_at: list[float] = []

    def kill(pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    with NativeProcessEngine(model, tokenizer, what=WHAT) as engine:
        threading.Timer(0.3, kill, (engine.pid,)).start()
        started = time.monotonic()
        with pytest.raises(EngineError, match=r"stage 'policy'.*native_process.*died \(killed by SIGKILL\)"):
            while time.monotonic() - started < 30:  # generate until the kill lands in one
                engine.generate(ids, 4, _request(tokenizer, 1.0, 64), seed=0)
        assert time.monotonic() - killed_at[0] < 5
        noticed = time.monotonic()
        with pytest.raises(EngineError, match=r"stage 'policy'.*native_process.*died"):
            engine.sync_weights(model)
        with pytest.raises(EngineError, match=r"stage 'policy'.*native_process.*died"):
            engine.generate(ids, 1, _request(tokenizer, 0.0), seed=0)
        assert time.monotonic() - noticed < 3


def test_no_worker_after_close_even_with_a_generate_in_flight(tiny):
    """close() from another thread lets the generate in flight end (answered, or an EngineError)."""
    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS * 8)
    engine = NativeProcessEngine(model, tokenizer, what=WHAT)
    outcome: list = []

    def generate() -> None:
        try:
            outcome.append(engine.generate(ids, 4, _request(tokenizer, 1.0, 64), seed=0))
        except EngineError as error:
            outcome.append(error)

    with engine:
        pid = engine.pid
        assert _running(pid)
        in_flight = threading.Thread(target=generate)
        in_flight.start()
        time.sleep(0.2)
    in_flight.join(timeout=15)
    assert not in_flight.is_alive() and len(outcome) == 1
    assert not _running(pid)
    with pytest.raises(EngineError, match="not running"):
        engine.generate([[1]], 1, _request(tokenizer, 0.0), seed=0)
    engine.close()  # twice is fine


PARENT = """
import os, signal, threading, time, torch
from rlhf_core.rollout.engines.base import SamplingRequest
from rlhf_core.modeling.models import build_tiny_model
from rlhf_core.rollout.engines.native_process import NativeProcessEngine
from rlhf_core.rollout.engines.weight_export import plain_state_dict
from rlhf_core.spec import TinyModelSource
torch.set_num_threads(1)
model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, heads=2, layers=1), seed=0)
engine = NativeProcessEngine(model, tokenizer, what="stage 'p'").__enter__()
print(engine.pid, flush=True)
request = SamplingRequest(max_new_tokens=400, temperature=1.0)  # decoding for many seconds
threading.Thread(target=engine.generate, args=([[5, 6, 7]] * 256, 8, request, 0), daemon=True).start()
time.sleep(0.5)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_worker_dies_with_a_killed_parent_even_while_generating(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with (tmp_path / "stderr.txt").open("w") as stderr:
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
        )
        pid = int(parent.stdout.readline() or 0)  # the worker inherits the pipe: read one line only
        assert parent.wait(timeout=180) == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()
    try:
        assert pid and _wait_gone(pid, within_s=5), f"worker {pid} outlived its parent"
    finally:
        if pid and _running(pid):
            os.kill(pid, signal.SIGKILL)
        parent.stdout.close()
