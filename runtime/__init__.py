"""The stage runtime: what every stage kind shares, whatever it computes.

- ``stage_execution``: the life cycle (cache -> lock -> cache -> MLflow stage run -> body -> record);
- ``stage_contract``: its contract types (``RunContext``, ``StageCall``, ``StageRun``, ``StageOutcome``,
  ``StageBody``, ``StageCheck``);
- ``stage_tasks``: stage kinds -> their body, pre-run check and the Prefect task built from them;
- ``multiprocess``: a stage trained in several processes (ranks launched through accelerate, each
  calling the stage's body directly);
- ``fingerprint_lock``: one computation per fingerprint, on one host and across machines;
- ``checkpoint_sync``: checkpoints kept with the stage's MLflow run, for resume on another machine;
- ``progress`` and ``stage_reports``: progress events and the Prefect/MLflow reports of a stage.
"""
