"""One Prefect task per stage kind.

Each task resolves its input refs to files, calls ``rlhf_core`` to do the work, records the result
through ``registry`` and returns small refs. The shared life cycle (fingerprint, cache lookup, lock,
MLflow stage run, resume) is ``tasks.stage_execution.execute_stage``.
"""
