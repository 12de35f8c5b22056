"""LoRA adapters (peft) on a trained model; every trainer merges them back into a plain model at the end."""

from __future__ import annotations

from transformers import PreTrainedModel

from rlhf_core.spec import LoraSpec


def apply_lora(model: PreTrainedModel, lora: LoraSpec) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
