"""Selecting completions from scored samples (rejection sampling, best-of-N)."""
