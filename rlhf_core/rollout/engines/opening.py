"""Opening the rollout engine a stage's decoding settings name, for the length of a stage.

``with open_engine(settings, policy, tokenizer, stage=..., log_dir=...) as engine:`` yields the name of
an in-process loop (``native``, ``transformers``: nothing to start) or an open vLLM engine, which
:func:`rlhf_core.rollout.generation.generate` and the on-policy trainer both accept. The settings are read
through :class:`EngineChoice` (the spec's ``SamplingSpec`` / ``GenerationSpec`` are ones), so the spec
stays above this package.
"""

from __future__ import annotations

import os
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
        devices=vllm.devices if vllm.placement == "server" else rank_device(cuda),
        extra_args=tuple(vllm.extra_args),
        startup_timeout_s=vllm.startup_timeout_s,
    )


def rank_device(cuda: bool) -> str | None:
    """A colocated engine's GPU in a multi-process stage: the one of this rank (``LOCAL_RANK`` among the
    visible devices), so each rank's engine decodes beside its own trainer; None (inherited) otherwise."""
    local_rank = os.environ.get("LOCAL_RANK")
    if not cuda or local_rank is None or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[int(local_rank)] if visible else local_rank


def server_log(rank: int, world: int) -> str:
    """The engine's log file name: one per rank in a multi-process stage."""
    return SERVER_LOG if world == 1 else SERVER_LOG.replace(".log", f"-rank{rank}.log")


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
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    running = vllm.url is not None  # someone else's server: no local engine environment needed
    engine = VLLMEngine(
        policy, tokenizer, Path("-") if running else require_vllm_python(stage), settings,
        what=f"stage '{stage}', engine vllm", log_path=Path(log_dir) / server_log(rank, world),
        sleeps=settings.enable_sleep_mode and not running, url=vllm.url,
        weights_root=Path(vllm.weights_dir) if running else None,
    )  # fmt: skip
    with engine:
        yield engine
