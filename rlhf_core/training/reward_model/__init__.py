"""Reward-model training (book ch.5)."""
