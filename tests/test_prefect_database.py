"""Several runs started at once on a fresh home all get a working temporary-server database.

Without the lock in ``cli.prefect_database`` each run's temporary Prefect server migrates the same new
SQLite file at once and some fail ("duplicate column name", "Online migration expected to match one row").
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import traceback

from rlhf_core.settings import OFFLINE_DEFAULTS

PROCESSES = 4


def _first_run(prefect_home: str, index: int, barrier, errors) -> None:
    """Set up a fresh PREFECT_HOME, import everything, wait for the others, then migrate."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ["PREFECT_HOME"] = prefect_home
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "true"
    # Imported before the barrier, so that the processes reach the migrations together.
    import alembic.command  # noqa: F401
    import prefect.server.database.alembic_commands  # noqa: F401
    from prefect.server.database import provide_database_interface

    from cli.prefect_database import initialize_temporary_server_database

    provide_database_interface()

    barrier.wait(timeout=60)
    try:
        initialize_temporary_server_database()
    except Exception:
        errors.put(f"process {index}: {traceback.format_exc(limit=1)}")


def test_first_migration_from_several_processes_at_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    errors = context.Queue()
    home = tmp_path / "prefect"
    processes = [
        context.Process(target=_first_run, args=(str(home), i, barrier, errors)) for i in range(PROCESSES)
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
    failures = [errors.get(timeout=5) for _ in range(errors.qsize())]
    assert not failures, "\n".join(failures)
    assert [p.exitcode for p in processes] == [0] * PROCESSES
    assert (home / "prefect.db.ready").exists()
    with sqlite3.connect(home / "prefect.db") as db:  # migrated to the end: the server would start as is
        assert db.execute("select count(*) from alembic_version").fetchone() == (1,)
        assert db.execute("select count(*) from sqlite_master where name = 'flow_run'").fetchone() == (1,)
