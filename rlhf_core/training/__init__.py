"""Offline trainers (SFT, reward model) and the optimizer-step loop they share."""

PROGRESS_METRIC = "train/progress"  # fraction of the run's optimizer steps done, logged by the loop
