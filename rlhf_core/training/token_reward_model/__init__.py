"""Outcome and process reward-model training (book ch.5): per-token heads on correctness labels."""
