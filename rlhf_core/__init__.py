"""rlhf_core: the pure library behind the pipeline.

Spec, data, models, losses, training loops and evaluation. Nothing in this package imports
prefect or mlflow: training loops take a ``log(metrics, step)`` callback instead.
"""

__version__ = "0.1.0"
