"""The stage runtime: what every stage kind shares, whatever it computes.

- ``stage_execution``: the life cycle (cache -> lock -> cache -> MLflow stage run -> body -> record) and
  its contract types (``RunContext``, ``StageCall``, ``StageRun``, ``StageOutcome``);
- ``stage_tasks``: stage kinds -> their Prefect tasks;
- ``multiprocess``: a stage trained in several processes (ranks launched through accelerate);
- ``fingerprint_lock``: one computation per fingerprint, on one host and across machines;
- ``checkpoint_sync``: checkpoints kept with the stage's MLflow run, for resume on another machine;
- ``progress`` and ``stage_reports``: progress events and the Prefect/MLflow reports of a stage.
"""
