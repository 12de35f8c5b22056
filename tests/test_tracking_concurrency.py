"""Several pipelines started at once on a fresh home all get a working MLflow store.

Without the lock in ``registry.tracking.configure`` MLflow migrates a new SQLite file from every process at
once and all but one crash ("duplicate column name: step", "table ... already exists").
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from pathlib import Path

from rlhf_core.settings import OFFLINE_DEFAULTS

PROCESSES = 4


def _first_use(home: str, index: int, barrier, errors) -> None:
    """Import everything, wait for the others, then initialise the store and write to it."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from registry import tracking
    from rlhf_core.settings import RLHFSettings

    settings = RLHFSettings(home=Path(home))
    barrier.wait(timeout=60)
    try:
        tracking.configure(settings)
        experiment = tracking.ensure_experiment(f"pipeline-{index}", settings)
        run_id = tracking.start_pipeline_run(experiment, f"pipeline-{index}", {})
        tracking.client().create_registered_model(f"model-{index}")
        tracking.end_run(run_id)
    except Exception:
        errors.put(f"process {index}: {traceback.format_exc(limit=1)}")


def test_first_initialisation_from_several_processes_at_once(tmp_path):
    context = multiprocessing.get_context("spawn")  # fresh interpreters, as separate `rlhf run`s are
    barrier = context.Barrier(PROCESSES)
    errors = context.Queue()
    home = tmp_path / "home"
    processes = [
        context.Process(target=_first_use, args=(str(home), i, barrier, errors)) for i in range(PROCESSES)
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
    failures = [errors.get(timeout=5) for _ in range(errors.qsize())]
    assert not failures, "\n".join(failures)
    assert [p.exitcode for p in processes] == [0] * PROCESSES

    from mlflow import MlflowClient

    uri = f"sqlite:///{home.resolve() / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert {f"model-{i}" for i in range(PROCESSES)} <= {m.name for m in c.search_registered_models()}
    assert (home / "mlflow.db.ready").exists()
