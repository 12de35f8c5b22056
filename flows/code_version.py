"""Which code a pipeline or stage run runs: the git commit of the working tree, or, for a work-pool
worker running a deployment from a temporary copy (no git there), the version ``rlhf deploy`` gave the
deployment (its git commit). Recorded as ``rlhf.git_commit`` on runs, versions and model cards."""

from __future__ import annotations

import re

UNKNOWN_COMMIT = "unknown"
_COMMIT = re.compile(r"^[0-9a-f]{7,40}(\+dirty)?$")


def code_commit() -> str:
    """The git commit of the code this process runs: the working tree's; outside git (a worker runs a
    deployment from a temporary directory) the version ``rlhf deploy`` gave the running deployment;
    else ``unknown``."""
    from registry.tracking import git_commit

    commit = git_commit()
    if commit != UNKNOWN_COMMIT:
        return commit
    try:
        from prefect.runtime import deployment

        version = deployment.version  # None outside a deployment's run
    except Exception:  # noqa: BLE001 - lineage falls back to 'unknown', it never stops a run
        return commit
    return version if isinstance(version, str) and _COMMIT.match(version) else commit
