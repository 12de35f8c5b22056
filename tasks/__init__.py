"""One stage kind per file, each named for what it does (``train_sft``, ``optimize_policy``, ...), plus
the shared recording of their outputs (``dataset_outputs``, ``model_outputs``) and pre-run checks
(``input_checks``).

Each file holds its kind's body, a top-level function ``(call, run) -> outputs`` registered with
``@stage_task(SpecClass, check=...)``: resolve (the input refs to local files and rows), run (the
kind's ``rlhf_core`` entry point, ``run(stage, inputs, env)``), record (through ``registry``) and return
small refs. ``runtime.stage_tasks`` makes the Prefect task of each kind; the shared life cycle
(cache lookup, lock, MLflow stage run, resume) is ``runtime.stage_execution.execute_stage``.
"""
