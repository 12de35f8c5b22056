"""The vLLM rollout engine against the native loop, with one real vLLM server for the module.

What must hold (issue 19): greedy decoding equals the native loop token for token (fp32); sampled tokens
follow the model's distribution after temperature, top-k and top-p; a weight sync makes the engine decode
with the new weights (output changes, and equals native on them); EOS ends a completion and is kept;
max_new_tokens caps it; the engine's log-probs are the trainer's to float rounding, and perturbed engine
weights show up in the mismatch metrics and the TIS weights; a dead server is restarted once.
"""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path

import pytest
import torch
from scipy import stats

from rlhf_core.losses.importance_correction import mismatch_metrics, truncated_importance_weights
from rlhf_core.modeling.completion_scoring import completion_mask
from rlhf_core.modeling.models import build_tiny_model
from rlhf_core.rollout.engines.base import EngineError, SamplingRequest
from rlhf_core.rollout.engines.opening import server_settings
from rlhf_core.rollout.engines.vllm_engine import VLLMEngine, check_head_size
from rlhf_core.rollout.engines.vllm_environment import vllm_python
from rlhf_core.rollout.generation import decode_batch
from rlhf_core.rollout.token_scoring import encode_prompts, score_tokens
from rlhf_core.spec import TinyModelSource
from rlhf_core.spec.engines import VLLMSpec
from tests.engine_environment import TEST_VLLM, require_vllm

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny(one_torch_thread):
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=64, heads=2, layers=2), seed=0)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def started(tiny, tmp_path_factory):
    require_vllm()
    model, tokenizer = tiny
    settings = server_settings(VLLMSpec(**TEST_VLLM))
    log = tmp_path_factory.mktemp("engine") / "vllm-server.log"
    with VLLMEngine(
        model, tokenizer, vllm_python(), settings, what="stage 't', engine vllm", log_path=log
    ) as e:
        yield e


@pytest.fixture
def engine(started, tiny):
    """The module's engine holding the tiny model's own weights at the start of each test."""
    started.sync_weights(tiny[0])
    return started


PROMPTS = [f"What is {a} + {b}?" for a, b in [(1, 2), (3, 4), (5, 9), (2, 2), (7, 1), (6, 3), (8, 8), (4, 0)]]


def _native_greedy(model, tokenizer, prompt_ids, max_new_tokens):
    g = torch.Generator().manual_seed(0)
    return decode_batch(model, prompt_ids, 1, max_new_tokens, 0.0, 1.0, tokenizer.eos_token_id,
                        tokenizer.pad_token_id, g)  # fmt: skip


def _greedy(max_new_tokens, eos):
    return SamplingRequest(max_new_tokens, 0.0, eos_token_id=eos)


def test_greedy_decoding_equals_the_native_loop_token_for_token(engine, tiny):
    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS)
    out = engine.generate(ids, 1, _greedy(24, tokenizer.eos_token_id), seed=0)
    assert out.token_ids == _native_greedy(model, tokenizer, ids, 24)
    assert [len(lp) for lp in out.logprobs] == [len(t) for t in out.token_ids]


def test_the_engines_logprobs_are_the_trainers_to_float_rounding(engine, tiny):
    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS)
    out = engine.generate(ids, 2, SamplingRequest(16, 1.0, eos_token_id=tokenizer.eos_token_id), seed=3)
    prompts = [p for p in ids for _ in range(2)]
    old, *_ = score_tokens(model, None, None, prompts, out.token_ids, list(range(len(prompts))),
                           tokenizer.pad_token_id, False, 16)  # fmt: skip
    engine_grid = _grid(out.logprobs, old.shape[1])
    mask = completion_mask([len(t) for t in out.token_ids], old.shape[1], "cpu")
    assert float((old - engine_grid).abs()[mask].max()) < 1e-4
    metrics = mismatch_metrics(old, engine_grid, mask, cap=2.0)
    assert abs(metrics["kl_k1"]) < 1e-5 and metrics["kl_k3"] < 1e-8
    assert metrics["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4) and metrics["tis_capped_share"] == 0


def _grid(rows, width):
    return torch.tensor([r + [float("nan")] * (width - len(r)) for r in rows])  # garbage in the padding


def test_a_weight_sync_changes_the_output_to_what_native_decodes_from_the_new_weights(engine, tiny):
    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS)
    before = engine.generate(ids, 1, _greedy(24, tokenizer.eos_token_id), seed=0).token_ids
    updated = _perturbed(model, scale=0.5, seed=1)
    engine.sync_weights(updated)
    after = engine.generate(ids, 1, _greedy(24, tokenizer.eos_token_id), seed=0).token_ids
    assert after != before
    assert after == _native_greedy(updated, tokenizer, ids, 24)


def _perturbed(model, scale, seed):
    """A copy of ``model`` with every weight moved by N(0, (scale * its std)^2)."""
    copied = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copied.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return copied


def test_perturbed_engine_weights_show_in_the_mismatch_and_the_importance_weights(engine, tiny):
    """The trainer keeps the true weights; the engine samples from perturbed ones (a stand-in for a
    sampler whose numerics differ): the logged KL and the TIS weights must react, growing with the
    perturbation, and the cap must bound every weight."""
    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS)
    prompts = [p for p in ids for _ in range(4)]
    found = []
    for scale in (0.0, 0.1, 3.0):
        engine.sync_weights(_perturbed(model, scale, seed=2))
        out = engine.generate(ids, 4, SamplingRequest(16, 1.0, eos_token_id=tokenizer.eos_token_id), seed=5)
        old, *_ = score_tokens(model, None, None, prompts, out.token_ids, list(range(len(prompts))),
                               tokenizer.pad_token_id, False, 32)  # fmt: skip
        engine_grid = _grid(out.logprobs, old.shape[1])
        mask = completion_mask([len(t) for t in out.token_ids], old.shape[1], "cpu")
        weights = truncated_importance_weights(old, engine_grid, mask, cap=2.0)
        assert float(weights.max()) <= 2.0 and float(weights[~mask].abs().max()) == 0.0
        found.append(mismatch_metrics(old, engine_grid, mask, cap=2.0))
    kl = [m["kl_k3"] for m in found]
    assert kl[0] < 1e-8 < kl[1] < kl[2], kl
    assert found[2]["kl_k1"] > 1e-3 and found[2]["tis_capped_share"] > 0
    assert abs(found[2]["tis_weight_mean"] - 1.0) > abs(found[0]["tis_weight_mean"] - 1.0)


def test_eos_ends_a_completion_and_is_kept_and_max_new_tokens_caps_it(engine, tiny):
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    ids = encode_prompts(tokenizer, PROMPTS)
    out = engine.generate(ids, 2, SamplingRequest(12, 1.0, eos_token_id=eos), seed=0)
    for tokens in out.token_ids:
        assert 1 <= len(tokens) <= 12
        assert eos not in tokens[:-1]  # nothing after an EOS
        assert tokens[-1] == eos or len(tokens) == 12
    short = engine.generate(ids, 2, SamplingRequest(3, 1.0, eos_token_id=eos), seed=0)
    assert all(len(t) <= 3 for t in short.token_ids)
    engine.sync_weights(_always(model, eos))
    assert engine.generate(ids, 1, _greedy(12, eos), seed=0).token_ids == [[eos]] * len(ids)
    engine.sync_weights(_always(model, 7))  # a policy that never says EOS
    assert engine.generate(ids, 1, _greedy(5, eos), seed=0).token_ids == [[7] * 5] * len(ids)


def _always(model, token_id):
    """A copy of ``model`` whose greedy next token is always ``token_id``: the blocks add nothing to the
    residual stream, every embedding is all ones, and only ``token_id``'s output row is non-zero."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for layer in copied.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        copied.model.embed_tokens.weight.fill_(1.0)
        copied.model.norm.weight.fill_(1.0)
        copied.lm_head.weight.zero_()
        copied.lm_head.weight[token_id] = 1.0
    return copied


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 6, 1.0), (0.7, 0, 0.5), (1.3, 10, 0.8)])
def test_sampled_tokens_follow_the_models_distribution(engine, tiny, temperature, top_k, top_p):
    """4000 one-token samples of one prompt against softmax(logits / T) restricted by top-k, then top-p
    (renormalized): a chi-square test at significance 1e-4 (a correct engine fails it once in 10,000
    runs), and no sample outside the allowed set."""
    model, tokenizer = tiny
    (prompt,) = encode_prompts(tokenizer, ["What is 3 + 5?"])
    expected = _allowed_distribution(model, prompt, temperature, top_k, top_p)
    request = SamplingRequest(1, temperature, top_p, top_k)  # no EOS: every sample is one token
    out = engine.generate([prompt] * 40, 100, request, seed=11)
    counts = torch.bincount(torch.tensor([t[0] for t in out.token_ids]), minlength=len(expected)).double()
    allowed = expected > 0
    assert counts[~allowed].sum() == 0, "sampled a token outside the top-k / top-p set"
    _, p_value = stats.chisquare(counts[allowed].numpy(), (expected[allowed] * counts.sum()).numpy())
    assert p_value > 1e-4, f"p = {p_value:.2e} over {int(allowed.sum())} tokens"


@torch.no_grad()
def _allowed_distribution(model, prompt, temperature, top_k, top_p):
    logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double() / temperature
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits, -1)
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < top_p
    probs = torch.zeros_like(probs).scatter(0, order, ordered * keep)
    return probs / probs.sum()


def test_a_dead_engine_is_restarted_once_then_the_stage_fails(engine, tiny):
    """First only the engine-core process dies (as under the OOM killer; the API server answers 500, then
    exits): the engine is restarted and answers as before. Then the whole server dies again: the stage's
    error names stage and engine."""
    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS[:2])
    expected = engine.generate(ids, 1, _greedy(8, tokenizer.eos_token_id), seed=0).token_ids
    os.kill(_engine_core_pid(engine.server.process.pid), signal.SIGKILL)
    assert engine.generate(ids, 1, _greedy(8, tokenizer.eos_token_id), seed=0).token_ids == expected
    assert engine.restarted
    os.killpg(engine.server.process.pid, signal.SIGKILL)
    with pytest.raises(EngineError, match=r"stage 't', engine vllm: the vLLM server died again"):
        engine.generate(ids, 1, _greedy(8, tokenizer.eos_token_id), seed=0)
    engine.restarted = False  # give the module's engine back alive for any test after this one
    engine.server.restart()


def _engine_core_pid(server_pid: int) -> int:
    """The engine-core process in the server's session (vLLM names it VLLM::EngineCore)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (
                    b"VLLM::EngineCore" in (proc / "cmdline").read_bytes()
                    and os.getsid(int(proc.name)) == server_pid
                ):
                    return int(proc.name)
            except OSError:
                continue
    raise AssertionError("no engine-core process found")


def test_a_head_size_the_cpu_engine_cannot_run_is_refused_before_starting(one_torch_thread):
    model, _ = build_tiny_model(TinyModelSource(hidden_size=64, heads=4, layers=1), seed=0)  # head size 16
    with pytest.raises(EngineError, match=r"stage 'x', engine vllm: the model's attention head size is 16"):
        check_head_size(model, "stage 'x', engine vllm")


@pytest.mark.parametrize("update_epochs", [1, 2])
def test_grpo_rollouts_from_the_engine_sync_weights_each_rollout_and_log_the_mismatch(
    engine, tiny, tmp_path, update_epochs
):
    """The on-policy trainer with the engine: one weight sync per rollout (the policy changed in between),
    the mismatch to pi_old at float-rounding level (same weights, fp32), TIS weights of 1, and training
    that moves the weights. pi_old comes from the update's own forward pass with one update per rollout,
    from a pass at the rollout with two: both are measured."""
    from rlhf_core.data.synthetic import synthetic_records
    from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
    from rlhf_core.training.policy_gradient.trainer import train_policy_gradient

    model, tokenizer = tiny
    policy = copy.deepcopy(model).train()
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    stage = PolicyGradientStage.model_validate({
        "kind": "policy_gradient", "algorithm": "grpo", "policy": "p", "prompts": "data.prompts",
        "rewards": [{"function": "answer_format"}], "rollouts": 3, "prompts_per_rollout": 4, "group_size": 4,
        "truncated": "score", "tis_cap": 2.0, "train": {"lr": 1e-2, "log_every": 1},
        "update_epochs": update_epochs,
        "generation": {"max_new_tokens": 6, "temperature": 1.0, "engine": "vllm", "vllm": TEST_VLLM},
    })  # fmt: skip
    logged: dict[int, dict] = {}
    syncs = engine.syncs

    def digit_share(rows):
        rewards = [sum(ch.isdigit() for ch in r["completion"]) / max(1, len(r["completion"])) for r in rows]
        return rewards, {"digits": rewards}

    trained, _, result = train_policy_gradient(
        policy, tokenizer, synthetic_records("arithmetic", "prompts", n=16, seed=0), stage, digit_share,
        seed=0, checkpoint_dir=tmp_path, log=lambda m, step: logged.setdefault(step, {}).update(m),
        engine=engine,
    )  # fmt: skip
    assert engine.syncs - syncs == 3
    rollouts = [m for m in logged.values() if "rollout/mismatch/kl_k3" in m]
    assert len(rollouts) == 3 and result.steps == 3 * update_epochs
    for metrics in rollouts:
        assert metrics["rollout/mismatch/kl_k3"] < 1e-8
        assert abs(metrics["rollout/mismatch/kl_k1"]) < 1e-5
        assert metrics["rollout/mismatch/tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert metrics["rollout/time/weight_sync_s"] > 0
    moved = max(float((trained.state_dict()[k] - v).abs().max()) for k, v in start.items())
    assert moved > 0 and result.rollouts == 3


def test_asynchronous_grpo_with_the_engine_runs_one_version_ahead(engine, tiny, tmp_path):
    """async_rollouts with the engine: the producer thread owns it, syncs it with each published snapshot
    between rounds, and the first rollout's mismatch is float rounding (its weights sampled it) while
    later rollouts, one version behind, show the lag."""
    from rlhf_core.data.synthetic import synthetic_records
    from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
    from rlhf_core.training.policy_gradient.trainer import train_policy_gradient

    model, tokenizer = tiny
    policy = copy.deepcopy(model).train()
    stage = PolicyGradientStage.model_validate({
        "kind": "policy_gradient", "algorithm": "grpo", "policy": "p", "prompts": "data.prompts",
        "rewards": [{"function": "answer_format"}], "rollouts": 4, "prompts_per_rollout": 4, "group_size": 4,
        "truncated": "score", "train": {"lr": 1e-2, "log_every": 1}, "async_rollouts": {"max_staleness": 1},
        "generation": {"max_new_tokens": 6, "temperature": 1.0, "engine": "vllm", "vllm": TEST_VLLM},
    })  # fmt: skip
    logged: dict[int, dict] = {}

    def digit_share(rows):
        rewards = [sum(ch.isdigit() for ch in r["completion"]) / max(1, len(r["completion"])) for r in rows]
        return rewards, {"digits": rewards}

    train_policy_gradient(
        policy, tokenizer, synthetic_records("arithmetic", "prompts", n=16, seed=0), stage, digit_share,
        seed=0, checkpoint_dir=tmp_path, log=lambda m, step: logged.setdefault(step, {}).update(m),
        engine=engine,
    )  # fmt: skip
    rollouts = [m for _, m in sorted(logged.items()) if "rollout/async/staleness_max" in m]
    assert [m["rollout/async/staleness_max"] for m in rollouts][0] == 0.0
    assert max(m["rollout/async/staleness_max"] for m in rollouts) == 1.0
    assert rollouts[0]["rollout/mismatch/kl_k3"] < 1e-8
    assert all("rollout/mismatch/tis_capped_share" in m for m in rollouts)


def test_episodes_through_the_engine_equal_the_native_loop_and_keep_the_environment_out_of_the_mismatch(
    engine, tiny, tmp_path
):
    """Multi-turn episodes (book ch.13) decoded by the engine: a policy that always ends its turn at once
    is told "try again" twice, so every episode interleaves its turns with the environment's messages.
    The engine's episodes equal the native loop's token for token; its log-probs cover every token, 0.0
    on the environment's; and GRPO over them measures the engine/trainer mismatch on the model's own
    tokens only (the environment's tokens, where the engine reports 0.0 and the trainer a real log-prob,
    would otherwise dominate it)."""
    from rlhf_core.data.synthetic import synthetic_records
    from rlhf_core.environments.conversation import VerifierFeedback
    from rlhf_core.rollout.episodes import EpisodeLimits, engine_turns, native_turns, run_episodes
    from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
    from rlhf_core.training.policy_gradient.trainer import train_policy_gradient

    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    ends_at_once = _always(model, eos)
    engine.sync_weights(ends_at_once)
    rows = synthetic_records("arithmetic", "prompts", n=4, seed=0)

    def episodes(decode):
        environments = [VerifierFeedback(verifier="arithmetic_exact", max_attempts=3) for _ in rows]
        return run_episodes(decode, tokenizer, environments, rows, list(range(len(rows))), EpisodeLimits(4),
                            seed=0, where="stage 't'", max_new_tokens=8)  # fmt: skip

    from_engine = episodes(engine_turns(engine, _greedy(8, eos)))
    native = episodes(native_turns(ends_at_once, tokenizer, max_new_tokens=8, temperature=0.0, top_p=1.0,
                                   top_k=0, batch_size=8))  # fmt: skip
    assert [e.response_ids for e in from_engine] == [e.response_ids for e in native]
    for episode in from_engine:
        assert episode.turns == 3 and episode.outcome == "done" and not all(episode.action_mask)
        assert len(episode.logps) == len(episode.response_ids)
        assert all(lp == 0.0 for lp, own in zip(episode.logps, episode.action_mask, strict=True) if not own)
    stage = PolicyGradientStage.model_validate({
        "kind": "policy_gradient", "algorithm": "grpo", "policy": "p", "prompts": "data.prompts",
        "rollouts": 2, "prompts_per_rollout": 2, "group_size": 2, "train": {"lr": 1e-3, "log_every": 1},
        "environment": {"name": "verifier_feedback", "verifier": "arithmetic_exact", "max_turns": 3},
        "generation": {"max_new_tokens": 4, "temperature": 1.0, "engine": "vllm", "vllm": TEST_VLLM},
    })  # fmt: skip
    logged: dict[int, dict] = {}
    train_policy_gradient(
        copy.deepcopy(ends_at_once).train(), tokenizer, rows * 2,
        stage, lambda rows: ([0.0] * len(rows), {}), seed=0, checkpoint_dir=tmp_path,
        log=lambda m, step: logged.setdefault(step, {}).update(m), engine=engine,
    )  # fmt: skip
    rollouts = [m for m in logged.values() if "rollout/mismatch/kl_k3" in m]
    assert len(rollouts) == 2
    for metrics in rollouts:
        assert metrics["rollout/episode/environment_tokens"] > 0
        assert metrics["rollout/mismatch/kl_k3"] < 1e-6
