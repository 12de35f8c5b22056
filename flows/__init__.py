"""Prefect flows: a PipelineSpec compiled into stage tasks (pipeline), what would run (plan), stages
sent to work pools (dispatch, stage runner, work pools) and deployments. No algorithms, no MLflow calls."""
