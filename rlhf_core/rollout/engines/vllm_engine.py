"""The ``vllm`` rollout engine: a vLLM server (:mod:`.vllm_server`) decoding with the policy's current
weights.

Life cycle in a stage: ``start`` writes the policy as a checkpoint directory (:mod:`.weight_export`;
under /dev/shm where there is one) and starts the server on it; ``generate`` sends one request per prompt
(token ids, n samples, the prompt's own seed, the sampled tokens' log-probs), all in flight together so
the engine batches them; ``sync_weights`` rewrites the weights file and has the engine reload it
(``reload_weights`` through ``/collective_rpc``, then its prefix cache is reset); ``close`` stops the
server and removes the directory.

Placement ``colocated`` shares the training device: between rollouts the engine sleeps (vLLM's sleep
mode, level 2: KV cache and weights freed) and wakes before the next sync. On a CPU, vLLM's sleep mode
frees nothing, so the engine is simply left running there.

A server that dies is restarted once (its weights re-synced) and the call repeated; a second failure
ends the stage with an EngineError naming stage and engine and quoting the server's log.

Log-probs are vLLM's ``raw_logprobs``: log pi(token) under the model at temperature 1, before top-k/top-p,
the same quantity the trainer computes (so their difference is the train/inference mismatch).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.rollout.engines.base import EngineError, EngineOutput, SamplingRequest, prompt_seeds
from rlhf_core.rollout.engines.vllm_server import RunningServer, ServerSettings, VLLMServer
from rlhf_core.rollout.engines.weight_export import write_engine_checkpoint, write_engine_weights

MAX_IN_FLIGHT = 256  # requests sent together; the engine's own scheduler batches them
HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
ENGINE_EXIT_WAIT_S = 15.0  # after a 5xx, how long the server may take to exit if its engine died


class EngineFailed(Exception):
    """The server answered 5xx: its engine failed (it may be dying)."""


class VLLMEngine:
    """``with VLLMEngine(...) as engine: engine.generate(...)``; started from ``policy``'s weights."""

    name = "vllm"

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        python: Path,
        settings: ServerSettings,
        *,
        what: str,
        log_path: Path,
        sleeps: bool = False,
        weights_root: Path | None = None,
        url: str | None = None,
    ) -> None:
        """``url``: a running server to use (``RunningServer``) instead of starting one; the weights are
        then written under ``weights_root``, a directory the server sees at the same path."""
        self.policy, self.tokenizer, self.what, self.sleeps = policy, tokenizer, what, sleeps
        root = weights_root or shared_memory_dir() or Path(tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_checkpoints(root)
        self.checkpoint_dir = Path(tempfile.mkdtemp(prefix=f"{CHECKPOINT_PREFIX}{os.getpid()}-", dir=root))
        if url is None:
            self.server = VLLMServer(python, self.checkpoint_dir, settings, log_path, what=what)
        else:
            self.server = RunningServer(url, settings, what=what)
        self.weights_dtype = HALF_DTYPES.get(settings.dtype)  # None: as the policy holds them
        self.asleep = False
        self.restarted = False
        self.syncs = 0

    def start(self) -> None:
        if not isinstance(self.server, RunningServer):  # a server elsewhere may be on a GPU
            check_head_size(self.policy, self.what)
        write_engine_checkpoint(self.policy, self.tokenizer, self.checkpoint_dir, self.weights_dtype)
        self.server.start()
        if isinstance(self.server, RunningServer):  # it serves other weights: hand it the policy's
            self._reload()

    def generate(
        self, prompt_ids: list[list[int]], n: int, request: SamplingRequest, seed: int
    ) -> EngineOutput:
        self._wake()
        try:
            return self._generate(prompt_ids, n, request, seed)
        except (httpx.HTTPError, EngineFailed) as error:
            self._recover(error)
            return self._generate(prompt_ids, n, request, seed)

    def sync_weights(self, model: PreTrainedModel | dict[str, torch.Tensor]) -> None:
        """The engine decodes with ``model``'s weights as they are now (a PeftModel's merged), or with a
        snapshot of them (``weight_export.plain_state_dict``)."""
        write_engine_weights(model, self.checkpoint_dir, self.weights_dtype)
        try:
            if self.asleep:
                self._wake()  # wakes it and reloads the file just written
            else:
                self._reload()
        except (httpx.HTTPError, EngineFailed) as error:
            self._recover(error)  # the restarted server starts from the file just written
        self.syncs += 1

    def release_memory(self) -> None:
        if self.sleeps and not self.asleep:
            self.server.post("/sleep", level=2)  # KV cache and weights freed; weights re-sent at wake
            self.asleep = True

    def close(self) -> None:
        self.server.stop()
        self.server.client.close()
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def __enter__(self) -> VLLMEngine:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _generate(
        self, prompt_ids: list[list[int]], n: int, request: SamplingRequest, seed: int
    ) -> EngineOutput:
        seeds = prompt_seeds(seed, len(prompt_ids))
        with ThreadPoolExecutor(max_workers=max(1, min(MAX_IN_FLIGHT, len(prompt_ids)))) as pool:
            answers = list(
                pool.map(
                    lambda i: self._complete(prompt_ids[i], n, request, seeds[i]), range(len(prompt_ids))
                )
            )
        tokens = [t for answer in answers for t, _ in answer]
        logprobs = [lp for answer in answers for _, lp in answer]
        return EngineOutput(tokens, logprobs)

    def _complete(
        self, prompt: list[int], n: int, request: SamplingRequest, seed: int
    ) -> list[tuple[list[int], list[float]]]:
        body = completion_body(self.server.model_name, prompt, n, request, seed)
        response = self.server.client.post(f"{self.server.url}/v1/completions", json=body)
        if response.status_code >= 500:  # the engine itself failed: maybe dead (restarted once)
            raise EngineFailed(f"{response.status_code}: {response.text[:1000]}")
        if response.status_code >= 300:  # the request itself was refused (e.g. longer than max_model_len)
            raise EngineError(
                f"{self.what}: the engine refused a request ({response.status_code}): {response.text[:1000]}"
            )
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        return [(list(c["token_ids"]), [float(x) for x in c["logprobs"]["token_logprobs"]]) for c in choices]

    def _reload(self) -> None:
        """The engine re-reads the weights file (which holds the last weights written)."""
        self.server.post(
            "/collective_rpc",
            {"method": "reload_weights", "kwargs": {"weights_path": str(self.checkpoint_dir)}},
        )
        self.server.post("/reset_prefix_cache")

    def _wake(self) -> None:
        if self.asleep:
            self.server.post("/wake_up")
            self.asleep = False
            self._reload()

    def _recover(self, error: Exception) -> None:
        """Restart a dead server once (it loads the weights file, which holds the last sync); re-raise
        anything else."""
        if isinstance(error, EngineFailed):
            self.server.wait_for_exit(ENGINE_EXIT_WAIT_S)  # vLLM's server exits once its engine core died
        if self.server.alive():
            raise EngineError(
                f"{self.what}: a request to the engine failed ({error}). {self.server.diagnosis()}"
            ) from error
        if self.restarted:
            raise EngineError(
                f"{self.what}: the vLLM server died again after a restart. {self.server.diagnosis()}"
            ) from error
        self.restarted = True
        self.server.restart()
        self.asleep = False


def completion_body(
    model: str, prompt: list[int], n: int, request: SamplingRequest, seed: int
) -> dict[str, Any]:
    """A ``/v1/completions`` request for ``n`` samples of one tokenized prompt."""
    body: dict[str, Any] = {
        "model": model, "prompt": prompt, "n": n, "seed": seed, "max_tokens": request.max_new_tokens,
        "temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k or -1,
        "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False,
    }  # fmt: skip
    if request.eos_token_id is not None:
        body["stop_token_ids"] = [request.eos_token_id]
    return body


def check_head_size(model: PreTrainedModel, what: str) -> None:
    """vLLM's CPU attention supports head sizes of at least 32 (docs/rollout-engine-notes.md); fail before
    a start-up that would take a minute to say so."""
    from rlhf_core.rollout.engines.vllm_environment import has_cuda

    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if not has_cuda() and head not in CPU_HEAD_SIZES:
        raise EngineError(
            f"{what}: the model's attention head size is {head}; vLLM on CPU supports "
            f"{sorted(CPU_HEAD_SIZES)} (hidden_size / num_attention_heads); use engine: native"
        )


CPU_HEAD_SIZES = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})


CHECKPOINT_PREFIX = "rlhf-engine-"  # rlhf-engine-<pid of the stage's process>-<random>


def remove_stale_checkpoints(root: Path) -> None:
    """Remove the engine checkpoints of processes that are gone (a killed stage cannot clean up; under
    /dev/shm each holds a model's weights in memory)."""
    for directory in root.glob(f"{CHECKPOINT_PREFIX}*-*"):
        pid = directory.name.removeprefix(CHECKPOINT_PREFIX).split("-")[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(directory, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shared_memory_dir() -> Path | None:
    """/dev/shm when it exists (weights written to memory, not disk); else the default temp dir."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else None
