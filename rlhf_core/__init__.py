"""rlhf_core: the pure library behind the pipeline.

Spec, data, models, losses, training loops and evaluation. Nothing in this package imports
prefect or mlflow: training loops take a ``log(metrics, step)`` callback instead.

A stack, bottom to top; a module imports only from its own layer or below (``tests/test_layering.py``):
ground (errors, refs, settings, the stage environment and result base), library code on plain values
(losses, data, modeling, rewards, rollout, selection), the spec, the fingerprint, stage code on spec
objects (dataset preparation and judging, evaluation, training).

The entry points of the dataset, sample, rejection-sampling, labeling, evaluation and promotion kinds
have one shape, ``run(stage, inputs, env) -> result``: the stage's spec, its resolved inputs as local
paths and rows, a ``StageEnvironment`` (``stage_environment``) and a result deriving from
``StageResult`` (``stage_results``).
"""

__version__ = "0.1.0"
