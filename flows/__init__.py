"""Prefect flows and the ``rlhf`` CLI: compile a PipelineSpec into tasks; no algorithms, no MLflow calls."""
