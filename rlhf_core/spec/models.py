"""Base models under ``models:``: a tiny model built from a config, a local directory, a hub name, or a
version of this home's Model Registry."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from rlhf_core.spec.base import Strict
from rlhf_core.spec.local_paths import LocalModelDir


class TinyModelSource(Strict):
    """A random-init decoder built from a config, with a tokenizer trained locally (offline quickstart)."""

    arch: Literal["llama"] = Field(default="llama", description="Decoder architecture of the config.")
    hidden_size: int = Field(default=128, ge=8, description="Width of the residual stream.")
    layers: int = Field(default=2, ge=1, description="Number of transformer blocks.")
    heads: int = Field(default=4, ge=1, description="Attention heads (hidden_size must divide by it).")
    intermediate_size: int | None = Field(default=None, description="MLP width; default 4 * hidden_size.")
    vocab_size: int = Field(default=512, ge=300, description="Size of the locally trained BPE vocabulary.")
    max_position_embeddings: int = Field(
        default=512, ge=16, description="Longest sequence the model accepts."
    )
    tokenizer_corpus: Literal["arithmetic", "arithmetic_tools"] = Field(
        default="arithmetic",
        description="Synthetic corpus the local tokenizer is trained on; arithmetic_tools adds tool "
        "declarations, calls and results (for tool-use pipelines: they tokenize in few tokens).",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyModelSource:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        return self


REGISTERED_MODEL_PATTERN = r"^models:/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9][A-Za-z0-9_-]*|/[0-9]+)$"


class ModelSource(Strict):
    """Where a base model comes from: exactly one of ``tiny``, ``path``, ``hub`` or ``registered``.

    The tokenizer's own chat template is used; a tokenizer without one gets ChatML.
    """

    tiny: TinyModelSource | None = Field(default=None, description="Build a tiny random-init model.")
    path: LocalModelDir | None = Field(
        default=None, description="Local directory saved with save_pretrained (relative to the spec file)."
    )
    hub: str | None = Field(default=None, description="Hugging Face hub name, e.g. Qwen/Qwen2.5-0.5B.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    registered: str | None = Field(
        default=None,
        description=(
            "A policy in this home's Model Registry: models:/<name>@<alias> (e.g. the current champion, "
            "to evaluate a candidate against it) or models:/<name>/<version>. An alias is resolved when "
            "the pipeline starts; the resolved version is what the fingerprint holds, so a moved alias "
            "re-runs what depends on it."
        ),
    )

    @field_validator("registered")
    @classmethod
    def _registry_reference(cls, reference: str | None) -> str | None:
        if reference is not None and not re.match(REGISTERED_MODEL_PATTERN, reference):
            raise ValueError(
                f"{reference!r} is not a registry reference: expected models:/<name>@<alias> or "
                "models:/<name>/<version>"
            )
        return reference

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSource:
        chosen = [k for k in ("tiny", "path", "hub", "registered") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(f"give exactly one of tiny, path, hub or registered (got {chosen or 'none'})")
        if self.revision is not None and self.hub is None:
            raise ValueError("revision goes with hub")
        return self

    @property
    def kind(self) -> str:
        return "tiny" if self.tiny else "path" if self.path else "hub" if self.hub else "registered"
