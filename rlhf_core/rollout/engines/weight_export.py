"""The policy's weights as the inference engine loads them: a Hugging Face checkpoint directory
(config, tokenizer, ``model.safetensors``) whose tensor names are the plain model's, LoRA adapters merged.

The engine is started from this directory and re-reads ``model.safetensors`` on every weight sync, so
the file is replaced atomically (write, then rename).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

WEIGHTS_FILE = "model.safetensors"


def write_engine_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
    dtype: torch.dtype | None = None,
) -> None:
    """Config, generation config, tokenizer and weights of ``model`` (a PeftModel is written merged)."""
    directory.mkdir(parents=True, exist_ok=True)
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    plain.config.save_pretrained(directory)
    plain.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_engine_weights(model, directory, dtype)


@torch.no_grad()
def write_engine_weights(
    model: PreTrainedModel | dict[str, torch.Tensor], directory: Path, dtype: torch.dtype | None = None
) -> None:
    """``model``'s current weights (or its :func:`plain_state_dict`, a snapshot) into
    ``directory/model.safetensors`` (atomically); floating-point tensors cast to ``dtype`` when given (an
    engine that runs in bf16 reads half the bytes of fp32)."""
    state = model if isinstance(model, dict) else plain_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / WEIGHTS_FILE)


@torch.no_grad()
def plain_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Tensor name -> CPU tensor, as the model would save them without adapters; a tied output embedding
    is left out (the engine's loader ties it to the input embedding again)."""
    if hasattr(model, "merge_adapter"):  # peft: fold the adapters in, read, and unfold them
        model.merge_adapter()
        try:
            state = _without_adapters(model.get_base_model().state_dict())
        finally:
            model.unmerge_adapter()
    else:
        state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    tied = _tied_names(model)
    return {name: tensor.contiguous() for name, tensor in state.items() if name not in tied}


def _without_adapters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        name.replace(".base_layer.", "."): tensor.detach().cpu().clone()
        for name, tensor in state.items()
        if "lora_" not in name
    }


def _tied_names(model: PreTrainedModel) -> set[str]:
    """The output embedding's name when it is tied to the input embedding (the loader re-ties it)."""
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(plain.config, "tie_word_embeddings", False):
        return {"lm_head.weight"}
    return set()
