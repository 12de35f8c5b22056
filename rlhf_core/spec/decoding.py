"""Decoding settings shared by the stages that generate (sampling, evaluation, judging)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from rlhf_core.spec.base import Strict
from rlhf_core.spec.engines import VLLMSpec

DecodingEngine = Literal["native", "transformers", "vllm"]


def engine_field() -> Any:
    return Field(
        default="native",
        description=(
            "Decoding loop: 'native' pre-fills each prompt once for all its samples and drops finished "
            "rows; 'transformers' calls model.generate per batch (same sampling rule, other random draws); "
            "'vllm' is a vLLM server in its own environment (settings under `vllm`)."
        ),
    )


class SamplingSpec(Strict):
    """Decoding settings for sampling N completions per prompt."""

    temperature: float = Field(default=1.0, gt=0, description="Softmax temperature (book: 0.7-1.0).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(default=0, ge=0, description="Sample among the k likeliest tokens only; 0: all.")
    max_new_tokens: int = Field(default=32, ge=1, description="Tokens generated per completion at most.")
    batch_size: int = Field(default=64, ge=1, description="Sequences decoded together (prompts x samples).")
    engine: DecodingEngine = engine_field()
    vllm: VLLMSpec = Field(default_factory=VLLMSpec, description="The vLLM engine's settings.")


class GenerationSpec(Strict):
    """Decoding settings used by evaluation."""

    max_new_tokens: int = Field(default=32, ge=1, description="Tokens generated per prompt at most.")
    temperature: float = Field(default=0.0, ge=0, description="0 means greedy decoding.")
    batch_size: int = Field(default=32, ge=1, description="Prompts decoded together.")
    engine: DecodingEngine = engine_field()
    vllm: VLLMSpec = Field(default_factory=VLLMSpec, description="The vLLM engine's settings.")
