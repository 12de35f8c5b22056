"""Rollout: batched, KV-cached generation from chat prompts, and N scored samples per prompt.

Used by the ``sample`` and ``evaluate`` stages and by on-policy training loops; generation leaves the
policy in the train/eval mode it found it in.
"""
