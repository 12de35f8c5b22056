"""Stage code that trains models.

- ``engine/``: the optimizer-step loop every trainer runs on (``loop``), the state handed to each step,
  data parallelism and FSDP2 (``data_parallel``), resumable checkpoints (``checkpoint``), LoRA (``lora``).
- ``monitor/``: the over-optimization monitor (proxy vs gold reward against the KL), its history and plots.
- one package per family: ``sft/``, ``reward_model/``, ``direct_alignment/``, ``policy_gradient/``.
"""

PROGRESS_METRIC = "train/progress"  # fraction of the run's optimizer steps done, logged by the loop
