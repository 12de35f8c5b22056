"""One Prefect task per stage kind, each a file named for what it does (``train_sft``,
``optimize_policy``, ...), plus the shared recording of their outputs (``dataset_outputs``,
``model_outputs``).

Each task resolves its input refs to files, calls ``rlhf_core`` to do the work, records the result
through ``registry`` and returns small refs. The shared life cycle (fingerprint, cache lookup, lock,
MLflow stage run, resume) is ``runtime.stage_execution.execute_stage``.
"""
