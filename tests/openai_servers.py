"""A real OpenAI-compatible server for tests: ``transformers serve`` over a tiny random Llama.

``transformers_judge_server(directory)`` saves a one-layer Llama (hidden size 32) and a byte-level BPE
tokenizer trained here on a few sentences (nothing comes from a model hub), starts
``transformers serve MODEL_DIR`` on a free loopback port in its own process group, waits for ``/health``,
and yields a :class:`JudgeServer`; ``finally`` stops the whole process group. The server is pinned to
that model and names it by its local path, so requests must send the path as ``model``.

Its answers are gibberish: tests use it for what goes over the wire (requests, errors, ordering,
caching), not for what a judge says. Serving needs ``openai``, ``fastapi`` and ``uvicorn`` besides
transformers (its ``serving`` extra); without them the tests using the server are skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect_servers import free_port  # one free-port helper for every server the tests start

STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
TOKENIZER_CORPUS = [
    "The judge compares two answers and explains which one is better.",
    "End with [[A]], [[B]] or [[C]]; a score ends with [[score: 7]].",
    "What is 2 + 3? The answer is 5.",
] * 20


@dataclass(frozen=True)
class JudgeServer:
    base_url: str  # http://127.0.0.1:PORT/v1
    model: str  # the name requests must send: the model directory's path
    log_path: Path
    startup_s: float  # model build and save, then process start until /health answered


def save_tiny_chat_model(directory: Path) -> Path:
    """A random-init one-layer Llama and a locally trained BPE tokenizer with ChatML, saved together."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_core.modeling.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(TOKENIZER_CORPUS, vocab_size=300)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _serve_command() -> list[str]:
    beside_python = Path(sys.executable).with_name("transformers")
    found = str(beside_python) if beside_python.exists() else shutil.which("transformers")
    if found is None:
        pytest.skip("no `transformers` command next to this Python or on PATH")
    return [found, "serve"]


def _skip_unless_serving_installed() -> None:
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.skip(
            "`transformers serve` needs openai, fastapi and uvicorn (pip install 'transformers[serving]')"
        )


@contextmanager
def transformers_judge_server(directory: Path) -> Iterator[JudgeServer]:
    """Build the tiny model under ``directory`` and serve it; stopped (process group) on exit."""
    _skip_unless_serving_installed()
    started = time.monotonic()
    model_dir = save_tiny_chat_model(Path(directory) / "tiny-judge")
    port = free_port()
    log_path = Path(directory) / "transformers-serve.log"
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = _serve_command() + [str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--device", "cpu", "--log-level", "warning"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", process, log_path)
        yield JudgeServer(
            base_url=f"http://127.0.0.1:{port}/v1",
            model=str(model_dir),
            log_path=log_path,
            startup_s=time.monotonic() - started,
        )
    finally:
        _stop_group(process)


def _wait_healthy(root: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"transformers serve exited ({process.returncode}):\n{log_path.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(root + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise RuntimeError(
        f"transformers serve not healthy after {STARTUP_TIMEOUT_S:.0f}s:\n{log_path.read_text()[-3000:]}"
    )


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)
    except ProcessLookupError:
        pass
