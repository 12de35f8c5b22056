"""The machinery every trainer shares: the optimizer-step loop and its step state, data parallelism
and FSDP2, resumable checkpoints, LoRA."""
