"""The temporary Prefect server's database, created once under an inter-process lock.

Without ``PREFECT_API_URL`` every ``rlhf run`` starts a temporary Prefect server, and the server migrates
its SQLite file (``<PREFECT_HOME>/prefect.db``) as it starts. Prefect's migration lock is a thread lock,
so runs started together on a fresh home migrate one file at once ("duplicate column name:
block_type_name", "Online migration expected to match one row"): a server fails to start and is retried
after a screenful of tracebacks, or the run fails. Here the first run migrates while the others wait;
``prefect.db.ready`` records that it is done, so later runs skip the lock without importing anything.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from rlhf_core.locked_initialization import initialize_once

SQLITE_PREFIXES = ("sqlite+aiosqlite:///", "sqlite:///")


def temporary_server_database() -> Path | None:
    """The SQLite file a temporary server would use, or None (a real server, another database)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = settings.server.database.connection_url
    if settings.api.url or not settings.server.ephemeral.enabled or url is None:
        return None
    url = url.get_secret_value()
    prefix = next((p for p in SQLITE_PREFIXES if url.startswith(p)), None)
    return Path(url.removeprefix(prefix)) if prefix else None


def initialize_temporary_server_database() -> None:
    """Migrate the temporary server's database now, one process at a time; a no-op once it is ready."""
    db_path = temporary_server_database()
    if db_path is None:
        return

    def create() -> str:
        import prefect
        from prefect.server.database import provide_database_interface

        asyncio.run(provide_database_interface().create_db())  # what the server runs on start-up
        return f"prefect {prefect.__version__}\n"

    initialize_once(db_path, create)
