"""One vLLM OpenAI-compatible server process: started from the engine's interpreter, waited for, asked
over HTTP, restarted, stopped.

The server runs in its own process group (vLLM spawns an engine-core process under it), so stopping it
stops them all; on Linux it also receives SIGTERM when the process that started it dies, so a killed
stage leaves no engine behind. Its output goes to a log file whose tail is quoted when it fails.

It starts with ``--generation-config vllm``: the engine then samples the model's own distribution, as
the native loop does, instead of applying the processors a checkpoint's generation_config may ask for.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from rlhf_core.child_processes import free_port, parent_death_signal
from rlhf_core.rollout.engines.base import EngineError

READY_POLL_S = 0.5
STOP_GRACE_S = 20.0


@dataclass(frozen=True)
class ServerSettings:
    """How the server is started (the spec's ``VLLMSpec`` fills it)."""

    dtype: str = "auto"
    max_model_len: int | None = None
    enforce_eager: bool = False
    gpu_memory_utilization: float | None = None
    cpu_kv_cache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE, on CPU only
    max_num_seqs: int | None = None
    enable_sleep_mode: bool = False
    # vLLM 0.32 on CPU crashes a seeded request whose prefill is split across steps ("CPU Generator does
    # not use offset", when it rewinds the request's generator): prefills are never split there
    chunked_prefill: bool = True
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port
    cpu_threads: int | None = None  # OMP threads of a CPU engine; None: vLLM's choice
    devices: str | None = None  # CUDA_VISIBLE_DEVICES of the server; None: inherited
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 3600.0
    environment: dict[str, str] = field(default_factory=dict)


class VLLMServer:
    """``with VLLMServer(python, model_dir, settings, log_path) as server: server.post(...)``."""

    def __init__(
        self, python: Path, model_dir: Path, settings: ServerSettings, log_path: Path, *, what: str
    ) -> None:
        self.python, self.model_dir, self.settings, self.log_path = (
            python,
            Path(model_dir),
            settings,
            log_path,
        )
        self.what = what  # "stage 'grpo', engine vllm": the start of every error message
        self.process: subprocess.Popen | None = None
        self.port = settings.port
        self.client = httpx.Client(timeout=settings.request_timeout_s)

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    @property
    def model_name(self) -> str:
        return str(self.model_dir)

    def command(self) -> list[str]:
        s = self.settings
        args = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
            "--host", s.host, "--port", str(self.port), "--dtype", s.dtype, "--generation-config", "vllm",
            "--max-logprobs", "1", "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if s.max_model_len is not None:
            args += ["--max-model-len", str(s.max_model_len)]
        if s.enforce_eager:
            args.append("--enforce-eager")
        if s.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(s.gpu_memory_utilization)]
        if s.max_num_seqs is not None:
            args += ["--max-num-seqs", str(s.max_num_seqs)]
        if s.enable_sleep_mode:
            args.append("--enable-sleep-mode")
        if not s.chunked_prefill:
            args.append("--no-enable-chunked-prefill")
        return args + list(s.extra_args)

    def environment(self) -> dict[str, str]:
        s = self.settings
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": f"{s.cpu_kv_cache_gib:g}"}
        env.pop("PYTHONPATH", None)  # the project's paths must not shadow the engine environment's packages
        if s.cpu_threads is not None:
            env["OMP_NUM_THREADS"] = str(s.cpu_threads)
        if s.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = s.devices
        return env | s.environment

    def start(self) -> None:
        """Launch the server and wait until it answers ``/health`` (else an EngineError quoting its log)."""
        if self.settings.port is None:
            self.port = free_port(self.settings.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                start_new_session=True, preexec_fn=parent_death_signal(),
            )  # fmt: skip
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineError(
                    f"{self.what}: the vLLM server exited with status {self.process.returncode} "
                    f"while starting. {self.diagnosis()}"
                )
            if self.healthy():
                return
            time.sleep(READY_POLL_S)
        self.stop()
        raise EngineError(
            f"{self.what}: the vLLM server did not answer within "
            f"{self.settings.startup_timeout_s:.0f} s. {self.diagnosis()}"
        )

    def healthy(self) -> bool:
        try:
            return self.client.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and self.healthy()

    def wait_for_exit(self, seconds: float) -> None:
        """Give a failing server up to ``seconds`` to exit (no-op when it keeps running)."""
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(seconds)

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()

    def post(self, path: str, payload: dict[str, Any] | None = None, **params: Any) -> Any:
        """POST to the server; a non-2xx answer is an EngineError quoting the server's message."""
        response = self.client.post(f"{self.url}{path}", json=payload, params=params or None)
        if response.status_code >= 300:
            raise EngineError(f"{self.what}: {path} answered {response.status_code}: {response.text[:1000]}")
        return response.json() if response.content else None

    def diagnosis(self, lines: int = 25) -> str:
        """The server log's last lines, with a plain reading of the failures users meet most."""
        tail = log_tail(self.log_path, lines)
        hints = [hint for needle, hint in FAILURE_HINTS if needle in tail]
        return " ".join(hints) + f" Last lines of {self.log_path}:\n{tail}"

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.client.close()


# (text in the server log, what it means for the user)
FAILURE_HINTS = (
    ("are not supported for now", "The model's architecture is not one vLLM supports."),
    ("Model architectures", "The model's architecture is not one vLLM supports."),
    ("Unsupported CPU attention configuration", "vLLM's CPU attention needs a head size in "
     "{32, 64, 80, 96, 112, 128, ...}: hidden_size / num_attention_heads of this model is not one."),
    ("out of memory", "The engine ran out of memory: lower gpu_memory_utilization / max_model_len, or the "
     "batch."),
    ("No available memory for the cache blocks", "No memory is left for the KV cache: raise "
     "gpu_memory_utilization (or cpu_kv_cache_gib on CPU) or lower max_model_len."),
)  # fmt: skip


def log_tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


class RunningServer(VLLMServer):
    """A vLLM server someone else started (e.g. ``rlhf serve MODEL --engine vllm`` on another machine,
    which runs it with the weight-reload route on): the stage connects to it, never starts, restarts or
    stops it. Its served model name is read from ``/v1/models``."""

    def __init__(self, url: str, settings: ServerSettings, *, what: str) -> None:
        super().__init__(Path("-"), Path("-"), settings, Path("-"), what=what)
        self.base = url.rstrip("/").removesuffix("/v1")
        self.served_name = ""

    @property
    def url(self) -> str:
        return self.base

    @property
    def model_name(self) -> str:
        return self.served_name

    def start(self) -> None:
        try:
            models = self.client.get(f"{self.base}/v1/models", timeout=30).json()["data"]
        except (httpx.HTTPError, ValueError, KeyError) as error:
            raise EngineError(f"{self.what}: no vLLM server answers at {self.base} ({error!r})") from error
        self.served_name = models[0]["id"]

    def alive(self) -> bool:
        return self.healthy()

    def restart(self) -> None:
        raise EngineError(
            f"{self.what}: the vLLM server at {self.base} stopped answering (it is not ours to restart)"
        )

    def stop(self) -> None:
        return None

    def wait_for_exit(self, seconds: float) -> None:
        return None

    def diagnosis(self, lines: int = 25) -> str:
        return f"The server at {self.base} runs elsewhere: see its own log."
