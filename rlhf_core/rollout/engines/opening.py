"""Opening the rollout engine a stage's decoding settings name, for the length of a stage.

``with open_engine(settings, policy, tokenizer, stage=..., log_dir=...) as engine:`` yields the name of
an in-process loop (``native``, ``transformers``: nothing to start) or an open vLLM engine, which
:func:`rlhf_core.rollout.generation.generate` and the on-policy trainer both accept. The settings are read
through :class:`EngineChoice` (the spec's ``SamplingSpec`` / ``GenerationSpec`` are ones), so the spec
stays above this package.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.rollout.engines.base import RolloutEngine
from rlhf_core.rollout.engines.vllm_engine import VLLMEngine
from rlhf_core.rollout.engines.vllm_environment import has_cuda, require_vllm_python
from rlhf_core.rollout.engines.vllm_server import ServerSettings

SERVER_LOG = "vllm-server.log"


class VLLMSettings(Protocol):
    """What starting the vLLM engine reads (the spec's ``VLLMSpec`` is one)."""

    @property
    def placement(self) -> str: ...  # 'colocated' or 'server'
    @property
    def dtype(self) -> str: ...
    @property
    def devices(self) -> str | None: ...
    @property
    def max_model_len(self) -> int | None: ...
    @property
    def max_num_seqs(self) -> int | None: ...
    @property
    def enforce_eager(self) -> bool: ...
    @property
    def cpu_kv_cache_gib(self) -> float: ...
    @property
    def cpu_threads(self) -> int | None: ...
    @property
    def startup_timeout_s(self) -> float: ...
    @property
    def extra_args(self) -> tuple[str, ...]: ...
    @property
    def url(self) -> str | None: ...  # a running server to use instead of starting one
    @property
    def weights_dir(self) -> str | None: ...  # with url: where that server reads the weights
    def memory_share(self) -> float: ...


class EngineChoice(Protocol):
    @property
    def engine(self) -> str: ...  # 'native', 'transformers' or 'vllm'
    @property
    def vllm(self) -> VLLMSettings: ...


def server_settings(vllm: VLLMSettings) -> ServerSettings:
    """How the server is started; sleep mode (freeing the device while the policy trains) only where it
    does something: colocated on a GPU."""
    cuda = has_cuda()
    return ServerSettings(
        dtype=vllm.dtype,
        max_model_len=vllm.max_model_len,
        enforce_eager=vllm.enforce_eager,
        gpu_memory_utilization=vllm.memory_share() if cuda else None,
        cpu_kv_cache_gib=vllm.cpu_kv_cache_gib,
        max_num_seqs=vllm.max_num_seqs,
        enable_sleep_mode=cuda and vllm.placement == "colocated",
        chunked_prefill=cuda,
        cpu_threads=vllm.cpu_threads,
        devices=vllm.devices if vllm.placement == "server" else None,
        extra_args=tuple(vllm.extra_args),
        startup_timeout_s=vllm.startup_timeout_s,
    )


@contextmanager
def open_engine(
    choice: EngineChoice,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    stage: str,
    log_dir: Path,
) -> Iterator[str | RolloutEngine]:
    """The engine ``choice`` names, open from the policy's current weights for the ``with`` block."""
    if choice.engine != "vllm":
        yield choice.engine
        return
    vllm = choice.vllm
    settings = server_settings(vllm)
    running = vllm.url is not None  # someone else's server: no local engine environment needed
    engine = VLLMEngine(
        policy, tokenizer, Path("-") if running else require_vllm_python(stage), settings,
        what=f"stage '{stage}', engine vllm", log_path=Path(log_dir) / SERVER_LOG,
        sleeps=settings.enable_sleep_mode and not running, url=vllm.url,
        weights_root=Path(vllm.weights_dir) if running else None,
    )  # fmt: skip
    with engine:
        yield engine
