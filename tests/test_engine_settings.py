"""The rollout engine's settings and plumbing, without starting an engine: what enters the fingerprint,
how the spec maps to the server's command line and requests, per-prompt seeds, the weights handed to
the engine (LoRA merged), and the clear error a stage gives for a model the CPU engine cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.fingerprint import fingerprint_parts
from rlhf_core.modeling.models import build_tiny_model, save_model
from rlhf_core.rollout.engines.base import EngineError, SamplingRequest, prompt_seeds
from rlhf_core.rollout.engines.opening import server_settings
from rlhf_core.rollout.engines.vllm_engine import completion_body
from rlhf_core.rollout.engines.vllm_server import VLLMServer
from rlhf_core.rollout.engines.weight_export import plain_state_dict, write_engine_checkpoint
from rlhf_core.spec import LoraSpec, TinyModelSource
from rlhf_core.spec.engines import VLLMSpec
from rlhf_core.spec.stages.policy_gradient import PolicyGradientStage
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training.engine.lora import apply_lora
from rlhf_core.training.policy_gradient.stage import PolicyGradientInputs, optimize_on_rollouts
from tests.engine_environment import require_vllm


def _stage(**generation) -> PolicyGradientStage:
    return PolicyGradientStage.model_validate({
        "kind": "policy_gradient", "algorithm": "grpo", "policy": "p", "prompts": "data.prompts",
        "rewards": [{"function": "answer_format"}], "rollouts": 1, "prompts_per_rollout": 2, "group_size": 2,
        "truncated": "score", "generation": {"max_new_tokens": 4, **generation},
    })  # fmt: skip


def test_the_engine_and_its_numerics_enter_the_fingerprint_but_not_where_it_runs():
    native = fingerprint_parts("policy_gradient", _stage(), {}, 0)
    vllm = fingerprint_parts("policy_gradient", _stage(engine="vllm"), {}, 0)
    assert "library:vllm" not in native and "library:vllm" in vllm
    assert native["config"] != vllm["config"]

    def config_of(**vllm_settings):
        return fingerprint_parts("policy_gradient", _stage(engine="vllm", vllm=vllm_settings), {}, 0)[
            "config"
        ]

    base = config_of()
    assert config_of(placement="server", devices="1", gpu_memory_utilization=0.8, enforce_eager=True) == base
    assert config_of(cpu_threads=1, cpu_kv_cache_gib=4, max_num_seqs=8, startup_timeout_s=60) == base
    assert config_of(dtype="bfloat16") != base
    assert config_of(extra_args=["--quantization", "fp8"]) != base


def test_the_spec_maps_to_the_servers_command_line():
    cpu = server_settings(VLLMSpec(placement="colocated", dtype="float32", enforce_eager=True, cpu_threads=1))
    assert not cpu.enable_sleep_mode and not cpu.chunked_prefill  # nothing to free, and vLLM's CPU bug
    assert cpu.gpu_memory_utilization is None and cpu.devices is None
    server = VLLMServer(Path("py"), Path("/m"), cpu, Path("server.log"), what="w")
    server.port = 1234
    command = server.command()
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    for flag in ("--enforce-eager", "--no-enable-chunked-prefill", "--generation-config"):
        assert flag in command
    assert (
        command[command.index("--dtype") + 1] == "float32"
        and command[command.index("--host") + 1] == "127.0.0.1"
    )
    assert server.environment()["OMP_NUM_THREADS"] == "1"
    assert "PYTHONPATH" not in server.environment()
    assert (
        VLLMSpec(placement="colocated").memory_share() == 0.3
        and VLLMSpec(placement="server").memory_share() == 0.9
    )


def test_a_request_asks_for_token_ids_log_probs_and_stops_at_eos():
    body = completion_body("m", [1, 2, 3], 4, SamplingRequest(8, 0.7, 0.9, 0, eos_token_id=2), seed=5)
    assert body["prompt"] == [1, 2, 3] and body["n"] == 4 and body["seed"] == 5 and body["max_tokens"] == 8
    assert body["top_k"] == -1 and body["top_p"] == 0.9 and body["temperature"] == 0.7  # -1: no top-k in vLLM
    assert body["logprobs"] == 0 and body["return_token_ids"] and body["stop_token_ids"] == [2]
    assert completion_body("m", [1], 1, SamplingRequest(8, 1.0, top_k=5), 0)["top_k"] == 5


def test_each_prompt_gets_its_own_seed_a_pure_function_of_seed_and_position():
    seeds = prompt_seeds(7, 100)
    assert seeds == prompt_seeds(7, 100) and len(set(seeds)) == 100
    assert prompt_seeds(7, 3) == seeds[:3] and prompt_seeds(8, 3) != seeds[:3]
    assert all(0 <= s < 2**31 for s in seeds)


def test_the_engine_gets_the_lora_policy_merged_under_the_plain_models_names(tmp_path, one_torch_thread):
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=64, heads=2, layers=1), seed=0)
    names = set(model.state_dict())
    peft = apply_lora(model, LoraSpec(r=2, alpha=4, target_modules=("q_proj", "v_proj")))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the weights
    exported = plain_state_dict(peft)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(exported) == names - tied
    merged = peft.merge_and_unload().state_dict()  # the reference merge, after the export
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, merged[name])
    write_engine_checkpoint(model, tokenizer, tmp_path / "engine")
    assert (tmp_path / "engine" / "config.json").exists() and (
        tmp_path / "engine" / "tokenizer.json"
    ).exists()
    assert set(load_file(tmp_path / "engine" / "model.safetensors")) == set(exported)


def test_a_model_the_cpu_engine_cannot_run_fails_the_stage_naming_stage_and_engine(
    tmp_path, one_torch_thread
):
    require_vllm()
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=64, heads=4, layers=1), seed=0)  # head 16
    policy_dir = save_model(model, tokenizer, tmp_path / "policy")
    inputs = PolicyGradientInputs(
        str(policy_dir), None, synthetic_records("arithmetic", "prompts", n=4, seed=0)
    )
    env = StageEnvironment.local("grpo", 0, tmp_path / "work")
    with pytest.raises(
        EngineError, match=r"stage 'grpo', engine vllm: the model's attention head size is 16"
    ):
        optimize_on_rollouts(_stage(engine="vllm"), inputs, env)
    assert not env.checkpoint_dir.exists() or not any(env.checkpoint_dir.iterdir())


def test_an_engine_in_bf16_is_handed_bf16_weights(tmp_path, one_torch_thread):
    from rlhf_core.rollout.engines.weight_export import write_engine_weights

    model, _ = build_tiny_model(TinyModelSource(hidden_size=64, heads=2, layers=1), seed=0)
    (tmp_path / "w").mkdir()
    write_engine_weights(model, tmp_path / "w", torch.bfloat16)
    written = load_file(tmp_path / "w" / "model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    reference = plain_state_dict(model)
    for name, tensor in written.items():
        torch.testing.assert_close(tensor, reference[name].to(torch.bfloat16))


def test_a_running_server_needs_placement_server_and_a_shared_weights_directory():
    with pytest.raises(ValueError, match="a running server needs placement: server and weights_dir"):
        VLLMSpec(url="http://gpu-box:8000/v1", placement="server")
    with pytest.raises(ValueError, match="placement: server"):
        VLLMSpec(url="http://gpu-box:8000/v1", weights_dir="/shared/w")  # colocated by default
    remote = {"placement": "server", "url": "http://gpu-box:8000/v1", "weights_dir": "/shared/w"}
    parts = fingerprint_parts("policy_gradient", _stage(engine="vllm", vllm=remote), {}, 0)
    assert parts["config"] == fingerprint_parts("policy_gradient", _stage(engine="vllm"), {}, 0)["config"]


@pytest.mark.parametrize(
    "env, cuda, expected",
    [
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "4,5"}, True, "5"),
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, True, "1"),
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "1", "CUDA_VISIBLE_DEVICES": "4,5"}, True, None),
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False, None),
        ({}, True, None),
    ],
)
def test_a_colocated_engine_in_a_multi_process_stage_takes_its_ranks_gpu(monkeypatch, env, cuda, expected):
    from rlhf_core.rollout.engines.opening import rank_device, server_log

    for name in ("LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert rank_device(cuda) == expected
    assert server_log(0, 1) == "vllm-server.log" and server_log(1, 2) == "vllm-server-rank1.log"
