"""Rollout: batched, KV-cached generation from chat prompts, N scored samples per prompt
(``sampling``), and G completions per prompt with per-token log-probs, entropy and values
(``token_scoring``).

Used by the ``sample`` and ``evaluate`` stages, by on-policy training loops and by the over-optimization
monitor; generation leaves the policy in the train/eval mode it found it in.
"""
