"""The project's native decoding loop in a background process: a rollout engine that generates while the
trainer trains (the CPU stand-in for a separate inference engine).

Asynchronous RL (book ch.6, off-policy correction) overlaps the generation of the next rollouts with the
updates on the current one; the samples then come from a policy a few updates old (pi_behaviour), and
the trainer weights each token by min(pi_old / pi_behaviour, C). This engine makes that possible without
a separate server: a worker process (spawned, so it owns its own torch threads) holds its own copy of the
policy and runs :func:`~rlhf_core.rollout.token_scoring.sample_groups`, then scores the sampled tokens
with the same weights (:func:`~rlhf_core.rollout.token_scoring.score_tokens`), so the log-probs it
returns are exactly pi_behaviour's.

Weights live in shared memory: the worker's parameters *are* shared tensors created at start (LoRA
adapters merged, :func:`~rlhf_core.rollout.engines.weight_export.plain_state_dict`). A sync copies the
new weights into them under a cross-process lock that the worker holds for a whole generate, so a
generate sees either the old or the new weights, never a mix; a version number counts the syncs.

The worker never outlives its parent: it polls its parent's pid (Linux's parent-death signal follows the
*thread* that started a child, and an engine may outlive the thread that opened it), and the parent never
waits on a dead worker: every wait polls the pipe with a timeout and checks that the worker is alive.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.modeling.completion_scoring import can_share_prefix
from rlhf_core.rollout.engines.base import EngineError, EngineOutput, SamplingRequest
from rlhf_core.rollout.engines.weight_export import plain_state_dict
from rlhf_core.rollout.token_scoring import sample_groups, score_tokens

POLL_S = 0.2  # how often a waiting parent checks that the worker is alive (and the worker its parent)


class NativeProcessEngine:
    """``sample_groups`` of the policy in a worker process, with the sampled tokens' log-probs at T = 1.

    ``what`` names the stage in errors; ``threads``: the worker's torch threads (default 1);
    ``batch_size``: sequences per decoding batch, as ``sample_groups`` takes it (and per scoring pass).
    Open it with ``with`` (or :meth:`start` / :meth:`close`). As with any spawned process, the main module
    is imported again in the worker: a script that opens the engine needs ``if __name__ == "__main__":``.
    """

    name = "native_process"

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        what: str,
        threads: int | None = None,
        batch_size: int = 64,
        start_timeout_s: float = 300.0,
    ) -> None:
        self.policy, self.what, self.batch_size = policy, what, batch_size
        self.threads, self.start_timeout_s = threads or 1, start_timeout_s
        self.eos_token_id, self.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.syncs = 0  # weight syncs since start
        self.last_sync_s = 0.0  # seconds the last sync took (merge, copy into shared memory)
        self.generated_version = -1  # how many syncs the weights of the last generate had seen
        self._process: Any = None
        self._conn: Connection | None = None
        self._calls = threading.Lock()  # one request on the pipe at a time

    # --- life cycle ----------------------------------------------------------------------------------

    def __enter__(self) -> NativeProcessEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Spawn the worker with the policy's current weights; returns once it is ready to generate."""
        if self._process is not None:
            return
        context = mp.get_context("spawn")
        try:
            self._weights = {k: v.share_memory_() for k, v in plain_state_dict(self.policy).items()}
        except (RuntimeError, OSError) as error:
            raise EngineError(
                f"{self.what}: the rollout engine {self.name} could not put the policy's weights in shared "
                f"memory ({error}); /dev/shm must hold a copy of the weights"
            ) from error
        self._lock = context.Lock()  # held by the worker for a whole generate, by the parent for a sync
        self._version = context.Value("q", 0, lock=False)  # guarded by self._lock
        self._conn, child = context.Pipe()
        plain = self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy
        worker = _Worker(plain.config, self._weights, self._lock, self._version, self.threads,
                         self.batch_size, self.eos_token_id, self.pad_token_id, os.getpid())  # fmt: skip
        self._process = context.Process(target=worker.serve, args=(child,), daemon=True, name=self.name)
        self._process.start()
        child.close()
        try:
            self._reply("start", time.monotonic() + self.start_timeout_s)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the worker (asked first, then terminated, then killed); safe to call twice."""
        process, conn, self._process, self._conn = self._process, self._conn, None, None
        if process is None:
            return
        with contextlib.suppress(OSError):  # the worker may be gone already
            conn.send(("stop",))
        process.join(timeout=5)
        for stop in (process.terminate, process.kill):
            if process.is_alive():
                stop()
                process.join(timeout=5)
        conn.close()

    @property
    def pid(self) -> int | None:
        """The worker's process id while it runs."""
        return None if self._process is None else self._process.pid

    # --- the RolloutEngine calls ---------------------------------------------------------------------

    def generate(
        self, prompt_ids: list[list[int]], n: int, request: SamplingRequest, seed: int
    ) -> EngineOutput:
        """``n`` samples of each prompt, as ``sample_groups`` gives them for the same weights, settings,
        seed and batch size, with log pi(token) of the weights that generated them (T = 1)."""
        if not prompt_ids:  # e.g. a rank with no chunk of a small round
            return EngineOutput([], [])
        with self._calls:
            self._check_alive()
            try:
                self._conn.send(("generate", prompt_ids, n, request, seed))  # type: ignore[union-attr]
            except (AttributeError, OSError):  # closed meanwhile, or the worker is gone
                raise self._stopped() from None
            token_ids, logprobs, self.generated_version = self._reply("generate", None)
        return EngineOutput(token_ids, logprobs)

    @torch.no_grad()
    def sync_weights(self, model: PreTrainedModel | dict[str, torch.Tensor]) -> None:
        """Copy ``model``'s weights (LoRA merged) into the worker's shared tensors; the worker decodes
        with them from its next generate on (one in flight finishes with the old weights first).
        ``model`` may also be its ``plain_state_dict`` (a cheap snapshot to hand a background producer)."""
        started = time.perf_counter()
        self._check_alive()
        state = model if isinstance(model, dict) else plain_state_dict(model)
        self._check_same_tensors(state)
        while not self._lock.acquire(timeout=POLL_S):  # a generate in flight holds it
            self._check_alive()
        try:
            for name, tensor in state.items():
                self._weights[name].copy_(tensor)
            self._version.value += 1
        finally:
            self._lock.release()
        self.syncs += 1
        self.last_sync_s = time.perf_counter() - started

    def release_memory(self) -> None:
        """Nothing to free: the worker holds CPU memory only."""

    # --- waiting on the worker -----------------------------------------------------------------------

    def _reply(self, action: str, deadline: float | None) -> Any:
        """The worker's answer to ``action``: its value, or an EngineError if it failed, died or (with a
        ``deadline``) did not answer in time."""
        conn = self._conn
        if conn is None:
            raise self._stopped()
        while True:
            try:
                message = conn.recv() if conn.poll(POLL_S) else None
            except (EOFError, OSError):  # the worker's end (or ours, closed meanwhile) is gone
                raise self._stopped() from None
            if message is not None:
                break
            self._check_alive()
            if deadline is not None and time.monotonic() > deadline:
                raise EngineError(f"{self.what}: the rollout engine {self.name} did not {action} in time")
        status, value = message
        if status == "error":
            raise EngineError(f"{self.what}: the rollout engine {self.name} failed to {action}: {value}")
        return value

    def _check_alive(self) -> None:
        if self._process is None or not self._process.is_alive():
            raise self._stopped()

    def _stopped(self) -> EngineError:
        """The error for a worker that is not there: closed, or died (how, where the exit code says)."""
        process = self._process
        if process is None:
            return EngineError(f"{self.what}: the rollout engine {self.name} is not running (closed)")
        process.join(timeout=1)  # the exit code is known once the process is reaped
        code = process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit {code}"
        memory = " (SIGKILL often means out of memory)" if code == -signal.SIGKILL else ""
        return EngineError(
            f"{self.what}: the rollout engine {self.name}'s worker process died ({how}){memory}"
        )

    def _check_same_tensors(self, state: dict[str, torch.Tensor]) -> None:
        shapes = {k: tuple(v.shape) for k, v in self._weights.items()}
        if {k: tuple(v.shape) for k, v in state.items()} != shapes:
            raise EngineError(
                f"{self.what}: the model given to the rollout engine {self.name} for a weight sync has "
                "other tensors than the policy it was started with (names or shapes differ)"
            )


@dataclass
class _SpecialTokens:
    """What ``sample_groups`` reads from a tokenizer (the worker needs no tokenizer)."""

    eos_token_id: int | None
    pad_token_id: int | None


@dataclass
class _Worker:
    """The worker process's side: build the model on the shared weights, then answer requests."""

    config: Any
    weights: dict[str, torch.Tensor]
    lock: Any
    version: Any
    threads: int
    batch_size: int
    eos_token_id: int | None
    pad_token_id: int | None
    parent_pid: int

    def serve(self, conn: Connection) -> None:
        threading.Thread(target=self._exit_with_parent, daemon=True).start()
        torch.set_num_threads(self.threads)
        try:
            model = self._build_model()
        except Exception as error:
            conn.send(("error", _describe(error)))
            return
        conn.send(("ok", None))
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the parent closed its end
                return
            if message[0] == "stop":
                return
            try:
                conn.send(("ok", self._generate(model, *message[1:])))
            except Exception as error:  # reported to the parent; the worker stays up
                conn.send(("error", _describe(error)))

    def _build_model(self) -> PreTrainedModel:
        """The architecture from the config, its parameters the shared tensors (no copy), tied again."""
        model = AutoModelForCausalLM.from_config(self.config)
        missing, unexpected = model.load_state_dict(self.weights, strict=False, assign=True)
        tied = {"lm_head.weight"} if getattr(self.config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        return model.eval()

    def _generate(
        self, model: PreTrainedModel, prompt_ids: list[list[int]], n: int, request: SamplingRequest, seed: int
    ) -> tuple[list[list[int]], list[list[float]], int]:
        """(token ids, their log-probs, the weights' version), all under the lock: one set of weights."""
        eos = request.eos_token_id if request.eos_token_id is not None else self.eos_token_id
        tokens = _SpecialTokens(eos, self.pad_token_id)
        with self.lock:
            version = int(self.version.value)
            completions = sample_groups(
                model, tokens, prompt_ids, n, max_new_tokens=request.max_new_tokens,  # type: ignore[arg-type]
                temperature=request.temperature, top_p=request.top_p, batch_size=self.batch_size,
                seed=seed, top_k=request.top_k,
            )  # fmt: skip
            rows = [prompt_ids[k // n] for k in range(len(completions))]
            groups = [k // n for k in range(len(completions))]
            logps, _, _, _ = score_tokens(
                model, None, None, rows, completions, groups, self.pad_token_id or 0,
                can_share_prefix(model), self.batch_size,
            )  # fmt: skip
        assert logps is not None
        logprobs = [logps[i, : len(c)].tolist() for i, c in enumerate(completions)]
        return completions, logprobs, version

    def _exit_with_parent(self) -> None:
        """End this process as soon as its parent is gone (it is re-parented then)."""
        while os.getppid() == self.parent_pid:
            time.sleep(POLL_S)
        os._exit(1)


def _describe(error: BaseException) -> str:
    """The exception's type and message, and where in the worker it was raised."""
    where = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    at = f" (at {where[0].filename}:{where[0].lineno})" if where else ""
    return f"{type(error).__name__}: {error}{at}"
