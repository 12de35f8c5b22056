"""Supervised fine-tuning (book ch.4)."""
