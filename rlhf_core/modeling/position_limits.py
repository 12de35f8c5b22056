"""The longest sequence a model accepts, read from its config without loading weights."""

from __future__ import annotations


def max_positions(source: str, revision: str | None = None) -> int | None:
    """``max_position_embeddings`` of a local model directory or hub name (its text config for
    multimodal models); None when the config cannot be read (e.g. a hub model not in the local cache
    while offline) or does not say."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError):
        return None
    return getattr(config.get_text_config(), "max_position_embeddings", None)
