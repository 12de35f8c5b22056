"""Settings of the vLLM rollout engine (``generation.engine: vllm``).

Only ``dtype`` and ``extra_args`` can change what the engine computes, so only they enter a stage's
fingerprint; where the engine runs and how much memory it takes do not.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf_core.spec.base import Strict
from rlhf_core.spec.endpoints import NOT_FINGERPRINTED_FIELD

Placement = Literal["colocated", "server"]
PLACEMENT_MEMORY_SHARE = {"colocated": 0.3, "server": 0.9}  # vLLM's gpu_memory_utilization by placement


def _where(default: Any, description: str, **kwargs: Any) -> Any:
    """A field about where or how the engine runs: left out of the fingerprint."""
    return Field(
        default=default, description=description, json_schema_extra=NOT_FINGERPRINTED_FIELD, **kwargs
    )


class VLLMSpec(Strict):
    """How the vLLM engine is started. It runs as a server process from its own environment
    (`rlhf engine install vllm`, or RLHF_VLLM_PYTHON), started and stopped by the stage."""

    placement: Placement = _where(
        "colocated",
        "colocated: on the training device, asleep (memory freed) while the policy trains; server: on its "
        "own devices (`devices`), always up. vLLM's sleep mode frees nothing on a CPU.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights and activations of the engine; auto: the checkpoint's dtype."
    )
    gpu_memory_utilization: float | None = _where(
        None, "Share of the GPU the engine may take; default 0.3 colocated, 0.9 server.", gt=0, le=1
    )
    devices: str | None = _where(None, "CUDA_VISIBLE_DEVICES of the engine (server placement), e.g. '1'.")
    max_model_len: int | None = _where(None, "Longest prompt + completion; default the model's.", ge=16)
    max_num_seqs: int | None = _where(None, "Sequences the engine decodes together at most.", ge=1)
    enforce_eager: bool = _where(False, "No CUDA graphs / torch.compile: starts faster, decodes slower.")
    cpu_kv_cache_gib: float = _where(1.0, "KV cache of an engine on CPU (VLLM_CPU_KVCACHE_SPACE).", gt=0)
    cpu_threads: int | None = _where(None, "Compute threads of an engine on CPU; default vLLM's.", ge=1)
    startup_timeout_s: float = _where(900.0, "How long the engine may take to start.", gt=0)
    url: str | None = _where(
        None,
        "A running vLLM server to use instead of starting one (placement server), e.g. the base URL that "
        "`rlhf serve MODEL --engine vllm` printed on another machine; it must serve the policy's "
        "architecture and reach `weights_dir`.",
    )
    weights_dir: str | None = _where(
        None,
        "With url: a directory this stage and that server both see at this path (a shared filesystem), "
        "where the policy's weights are written for each sync.",
    )
    extra_args: tuple[str, ...] = Field(
        default=(), description="More `vllm serve` arguments, e.g. ['--quantization', 'fp8']."
    )

    @model_validator(mode="after")
    def _url_needs_a_shared_directory(self) -> VLLMSpec:
        if self.url is not None and (self.placement != "server" or self.weights_dir is None):
            raise ValueError(
                "vllm.url: a running server needs placement: server and weights_dir (a directory it reads "
                "the policy's weights from, at the same path)"
            )
        return self

    def memory_share(self) -> float:
        return self.gpu_memory_utilization or PLACEMENT_MEMORY_SHARE[self.placement]
