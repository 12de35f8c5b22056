"""``rlhf serve``: a real ``rlhf serve`` process answers OpenAI's chat and completions routes with what the
project's own decoding gives in-process, reproduces seeded samples, refuses bad requests by field name,
listens on 127.0.0.1 by default, serves a registered ``models:/<name>@<alias>``, and is usable by the
endpoint judge client. With the vLLM engine environment installed, ``--engine vllm`` answers too.

The tiny model has hidden size 64 and 2 heads: head size 32, the smallest vLLM's CPU attention takes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from prefect_servers import free_port

from tests.engine_environment import require_vllm

PROMPT = "What is 3 + 4?"
STARTUP_TIMEOUT_S = 120.0
VLLM_STARTUP_TIMEOUT_S = 300.0


@dataclass
class Serving:
    """A running ``rlhf serve`` process and what it printed."""

    process: subprocess.Popen
    port: int
    lines: list[str]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def output(self) -> str:
        return "".join(self.lines)


@contextmanager
def rlhf_serve(
    *args: str, timeout_s: float = STARTUP_TIMEOUT_S, env: dict | None = None
) -> Iterator[Serving]:
    """Start ``rlhf serve ARGS --port P`` and wait for its ready line; stop it with SIGTERM afterwards and
    check that it stopped cleanly (exit status 0)."""
    port = free_port()
    command = [sys.executable, "-m", "cli.app", "serve", *args, "--port", str(port)]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    serving = Serving(process, port, [])
    reader = threading.Thread(target=lambda: serving.lines.extend(iter(process.stdout.readline, "")))
    reader.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not any(line.startswith("ready:") for line in serving.lines):
            assert process.poll() is None, f"rlhf serve exited with {process.returncode}:\n{serving.output()}"
            assert time.monotonic() < deadline, f"rlhf serve not ready in {timeout_s} s:\n{serving.output()}"
            time.sleep(0.2)
        yield serving
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            status = process.wait()
        reader.join(5)
    assert status == 0, f"rlhf serve exited with {status} after SIGTERM:\n{serving.output()}"
    assert "stopped" in serving.output()


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def chat(serving: Serving, model: str, **fields) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], **fields}
    status, answer = post(f"{serving.base_url}/chat/completions", body)
    assert status == 200, answer
    return answer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from rlhf_core.modeling.models import build_tiny_model, save_model
    from rlhf_core.spec import TinyModelSource

    shape = TinyModelSource(hidden_size=64, layers=1, heads=2, vocab_size=320, max_position_embeddings=128)
    model, tokenizer = build_tiny_model(shape, seed=0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def native(tiny_model_dir, tmp_path_factory) -> Iterator[Serving]:
    home = tmp_path_factory.mktemp("serve-home")
    with rlhf_serve(str(tiny_model_dir), "--engine", "native", "--home", str(home)) as serving:
        yield serving


@pytest.fixture(scope="module")
def in_process(tiny_model_dir, one_torch_thread):
    from rlhf_core.modeling.models import load_model

    return load_model(str(tiny_model_dir))


def test_the_default_bind_address_is_loopback(native, tiny_model_dir):
    assert f"ready: http://127.0.0.1:{native.port}/v1 serves model '{tiny_model_dir}'" in native.output()
    assert _listening_addresses(native.port) == {"127.0.0.1"}
    assert get(f"{native.base_url}/models")["data"][0]["id"] == str(tiny_model_dir)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on ``port``, from the kernel's table (/proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_greedy_chat_answer_equals_in_process_generate(native, tiny_model_dir, in_process):
    from rlhf_core.rollout.generation import generate

    model, tokenizer = in_process
    expected = generate(model, tokenizer, [PROMPT], max_new_tokens=12, temperature=0.0)
    answer = chat(native, str(tiny_model_dir), max_tokens=12, temperature=0)
    (choice,) = answer["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip() == expected.texts[0]  # generate strips its texts
    assert answer["usage"]["completion_tokens"] == expected.new_tokens[0]
    assert choice["finish_reason"] == ("length" if expected.new_tokens[0] == 12 else "stop")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert answer["usage"]["prompt_tokens"] == len(rendered)
    assert answer["usage"]["total_tokens"] == len(rendered) + expected.new_tokens[0]


def test_completions_from_text_and_from_token_ids_agree_with_the_native_loop(native, in_process):
    import torch

    from rlhf_core.rollout.generation import decode_batch

    model, tokenizer = in_process
    ids = tokenizer(PROMPT)["input_ids"]
    expected = decode_batch(model, [ids], 1, 10, 0.0, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id,
                            torch.Generator().manual_seed(0))[0]  # fmt: skip
    for prompt in (PROMPT, ids):
        status, answer = post(
            f"{native.base_url}/completions", {"prompt": prompt, "max_tokens": 10, "temperature": 0}
        )
        assert status == 200, answer
        assert answer["object"] == "text_completion"
        assert answer["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert answer["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected),
                                   "total_tokens": len(ids) + len(expected)}  # fmt: skip


def test_n_samples_with_a_seed_are_reproduced_by_the_same_seed(native, tiny_model_dir):
    sampled = {"max_tokens": 12, "temperature": 1.0, "n": 3}
    first = chat(native, str(tiny_model_dir), seed=11, **sampled)
    again = chat(native, str(tiny_model_dir), seed=11, **sampled)
    other = chat(native, str(tiny_model_dir), seed=12, **sampled)
    texts = lambda answer: [c["message"]["content"] for c in answer["choices"]]  # noqa: E731
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts(first) == texts(again)
    assert len(set(texts(first))) > 1  # three draws at T = 1 from 303 tokens: not all the same
    assert texts(other) != texts(first)


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "status", "named", "says"),
    [
        (
            {"messages": HI, "max_tokenz": 4},
            400,
            "max_tokenz",
            "unknown field 'max_tokenz'; the fields are: model,",
        ),
        (
            {"messages": HI, "temperature": -1},
            400,
            "temperature",
            "field 'temperature': Input should be greater",
        ),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "'system', 'user' or"),
        ({"messages": HI, "stream": True}, 400, "stream", "streaming is not supported"),
        ({"messages": HI, "max_tokens": 1000}, 400, "max_tokens", "context is 128 tokens"),
        ({"messages": HI, "model": "gpt-4o"}, 404, "model", "'gpt-4o' is not served here"),
        ({"max_tokens": 4}, 400, "messages", "field 'messages' is required"),
    ],
)
def test_a_bad_request_is_refused_naming_the_field(native, body, status, named, says):
    code, answer = post(f"{native.base_url}/chat/completions", body)
    assert code == status, answer
    assert answer["error"]["param"] == named
    assert says in answer["error"]["message"]


@pytest.mark.parametrize(
    ("prompt", "named", "says"),
    [
        ([5] * 200, "prompt", "the prompt has 200 tokens, but this model's context is 128 tokens"),
        ([5, 99999], "prompt", "token id 99999 is outside the vocabulary"),
        ([[5], []], "prompt[1]", "field 'prompt[1]' is empty"),
    ],
)
def test_a_bad_completions_prompt_is_refused_naming_it(native, prompt, named, says):
    code, answer = post(f"{native.base_url}/completions", {"prompt": prompt, "max_tokens": 4})
    assert code == 400, answer
    assert answer["error"]["param"] == named
    assert says in answer["error"]["message"]


def test_a_judge_client_gets_the_served_models_answers(native, tiny_model_dir):
    from rlhf_core.judging.endpoint_client import EndpointClient, EndpointSettings

    settings = EndpointSettings(base_url=native.base_url, model=str(tiny_model_dir), max_tokens=8)
    answers = EndpointClient(settings).complete([PROMPT, "Which answer is better, A or B?"])
    assert len(answers) == 2
    assert (
        answers[0]
        == chat(native, str(tiny_model_dir), max_tokens=8, temperature=0)["choices"][0]["message"]["content"]
    )


def test_a_registered_alias_is_served_from_the_homes_registry(tmp_path, tiny_model_dir, in_process, native):
    from registry import tracking
    from registry.models import log_and_register_model
    from rlhf_core.settings import RLHFSettings

    settings = RLHFSettings(home=tmp_path / "home")
    tracking.configure(settings)
    experiment = tracking.ensure_experiment("serve", settings)
    run = tracking.start_stage_run(
        experiment, tracking.start_pipeline_run(experiment, "serve", {}), "sft", {}
    )
    model, tokenizer = in_process
    _, version = log_and_register_model(run, model, tokenizer, "serve-policy", {"rlhf.stage": "sft"})
    tracking.client().set_registered_model_alias("serve-policy", "champion", version)

    uri = "models:/serve-policy@champion"
    with rlhf_serve(uri, "--engine", "native", "--home", str(settings.home)) as registered:
        assert f"{uri} is models:/serve-policy/{version}" in registered.output()
        assert get(f"{registered.base_url}/models")["data"][0]["id"] == uri
        answer = chat(registered, uri, max_tokens=12, temperature=0)
    # the same weights as the checkpoint directory: the same greedy answer
    assert answer["choices"] == chat(native, str(tiny_model_dir), max_tokens=12, temperature=0)["choices"]

    missing = subprocess.run(
        [sys.executable, "-m", "cli.app", "serve", "models:/serve-policy@nope", "--home", str(settings.home)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 2, missing.stderr
    assert "'models:/serve-policy@nope': no such registered version" in missing.stderr
    assert "serve-policy" in missing.stderr.split("registered models:")[1]


def test_vllm_engine_answers_as_the_native_loop_does(tiny_model_dir, native, tmp_path):
    require_vllm()
    name = str(tiny_model_dir)
    args = (name, "--engine", "vllm", "--home", str(tmp_path), "--vllm-arg=--enforce-eager")
    with rlhf_serve(*args, timeout_s=VLLM_STARTUP_TIMEOUT_S, env={"OMP_NUM_THREADS": "1"}) as engine:
        assert get(f"{engine.base_url}/models")["data"][0]["id"] == name
        answer = chat(engine, name, max_tokens=12, temperature=0)
        expected = chat(native, name, max_tokens=12, temperature=0)
        assert answer["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
        assert answer["usage"]["completion_tokens"] == expected["usage"]["completion_tokens"]
        _a_stage_uses_the_running_server_with_its_policys_weights(engine.base_url, tiny_model_dir, tmp_path)


def _a_stage_uses_the_running_server_with_its_policys_weights(base_url, model_dir, tmp_path):
    """``vllm: {placement: server, url, weights_dir}``: the stage connects to a server it did not start,
    hands it the policy's weights (here perturbed, so the served checkpoint's answers would differ) and
    decodes with them; then a sync after an update; closing the stage leaves the server running."""
    import torch

    from rlhf_core.modeling.models import load_model
    from rlhf_core.rollout.engines.base import SamplingRequest
    from rlhf_core.rollout.engines.opening import open_engine
    from rlhf_core.rollout.generation import decode_batch
    from rlhf_core.rollout.token_scoring import encode_prompts
    from rlhf_core.spec import SamplingSpec

    served, tokenizer = load_model(str(model_dir))
    policy = _moved(served, seed=1)
    spec = SamplingSpec(
        engine="vllm", vllm={"placement": "server", "url": base_url, "weights_dir": str(tmp_path / "shared")}
    )
    ids = encode_prompts(tokenizer, ["What is 2 + 3?", "What is 7 - 4?"])
    greedy = SamplingRequest(10, 0.0, eos_token_id=tokenizer.eos_token_id)

    def native_greedy(model):
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        return decode_batch(model.eval(), ids, 1, 10, 0.0, 1.0, eos, pad, torch.Generator().manual_seed(0))

    assert native_greedy(policy) != native_greedy(served)  # the test can tell whose weights decode
    with open_engine(spec, policy, tokenizer, stage="grpo", log_dir=tmp_path) as engine:
        assert engine.generate(ids, 1, greedy, seed=0).token_ids == native_greedy(policy)
        updated = _moved(policy, seed=2)
        engine.sync_weights(updated)
        assert engine.generate(ids, 1, greedy, seed=0).token_ids == native_greedy(updated)
    assert get(f"{base_url}/models")["data"], "the stage must not stop a server it did not start"


def _moved(model, seed):
    import copy

    import torch

    moved = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    return moved


def test_auto_picks_native_without_an_engine_environment_and_vllm_asked_for_is_a_user_error(
    monkeypatch, tmp_path
):
    from cli.serve_command import ServeEngine, choose_engine
    from rlhf_core.errors import UserError

    monkeypatch.setenv("RLHF_VLLM_PYTHON", str(tmp_path / "no-such-env" / "bin" / "python"))
    assert choose_engine(ServeEngine.auto) is ServeEngine.native
    assert choose_engine(ServeEngine.native) is ServeEngine.native
    with pytest.raises(
        UserError, match=r"option --engine vllm: RLHF_VLLM_PYTHON=.*no-such-env.* does not exist"
    ):
        choose_engine(ServeEngine.vllm)
    fake = tmp_path / "env" / "bin" / "python"  # an installed environment is what auto looks for
    fake.parent.mkdir(parents=True)
    fake.touch()
    monkeypatch.setenv("RLHF_VLLM_PYTHON", str(fake))
    assert choose_engine(ServeEngine.auto) is ServeEngine.vllm


def test_a_model_argument_that_is_no_model_is_a_user_error(tmp_path):
    from cli.serve_command import resolve_model_source
    from rlhf_core.errors import UserError

    with pytest.raises(UserError, match="argument MODEL: no such directory"):
        resolve_model_source(str(tmp_path / "missing"), None)
    with pytest.raises(UserError, match="is not a saved model directory"):
        resolve_model_source(str(tmp_path), None)
    assert resolve_model_source("org/some-model", None) == "org/some-model"  # a hub name, loaded later
