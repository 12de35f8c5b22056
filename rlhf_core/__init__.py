"""rlhf_core: the pure library behind the pipeline.

Spec, data, models, losses, training loops and evaluation. Nothing in this package imports
prefect or mlflow: training loops take a ``log(metrics, step)`` callback instead.

A stack, bottom to top; a module imports only from its own layer or below (``tests/test_layering.py``):
ground (errors, refs, settings), library code on plain values (losses, data, modeling, rewards,
rollout, selection), the spec, the fingerprint, stage code on spec objects (dataset preparation and
judging, evaluation, training).
"""

__version__ = "0.1.0"
