"""Offline token-level knowledge distillation (book ch.12)."""
