"""Settings (environment variables with the ``RLHF_`` prefix, or a ``.env`` file).

Everything the pipeline writes lives under ``home`` by default: the MLflow SQLite store and artifacts,
Prefect's home (its SQLite DB), stage work dirs (checkpoints) and cache locks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from rlhf_core.errors import UserError

# Offline and telemetry defaults, applied unless the user already set them (see stack notes).
OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # Quiet output: no per-file progress bars from the hub/transformers and MLflow artifact copies.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


class RLHFSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RLHF_", env_file=".env", extra="ignore")

    home: Path = Field(default=Path(".rlhf"), description="State directory of the project.")
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI (e.g. http://mlflow:5000); default sqlite:///<home>/mlflow.db.",
    )
    artifact_location: str | None = Field(
        default=None, description="Artifact root of new MLflow experiments; default <home>/mlartifacts."
    )
    prefect_home: Path | None = Field(default=None, description="PREFECT_HOME; default <home>/prefect.")
    checkpoint_upload: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Upload stage checkpoints to the stage's MLflow run, so a retry on another machine "
        "resumes: auto (only with an MLflow tracking server), always, never (e.g. a shared home).",
    )

    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    def resolved_tracking_uri(self) -> str:
        # Deliberately not $MLFLOW_TRACKING_URI: mlflow.set_tracking_uri() writes that variable, so one
        # pipeline run would silently redirect the next run (another --home) to its own store.
        if self.tracking_uri:
            check_no_password(self.tracking_uri)
        return self.tracking_uri or f"sqlite:///{self.resolved_home() / 'mlflow.db'}"

    def resolved_artifact_location(self) -> str:
        return self.artifact_location or (self.resolved_home() / "mlartifacts").as_uri()

    def resolved_prefect_home(self) -> Path:
        return (self.prefect_home or self.resolved_home() / "prefect").expanduser().resolve()

    def work_dir(self, stage: str, fingerprint: str) -> Path:
        """Scratch dir of one stage execution (checkpoints live here; keyed by fingerprint for resume)."""
        return self.resolved_home() / "work" / f"{stage}-{fingerprint[:16]}"

    def lock_dir(self) -> Path:
        return self.resolved_home() / "locks"


def check_no_password(tracking_uri: str) -> None:
    """The tracking URI is printed, linked from run descriptions and passed to every stage (Prefect keeps
    task parameters and deployment job variables): a password in it would be stored in all of them."""
    if urlsplit(tracking_uri).password is None:
        return
    raise UserError(
        "RLHF_TRACKING_URI holds a password (user:password@host); it would be printed and stored with "
        "every run. Give the bare URI and put credentials in the environment of each process instead: "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for an MLflow "
        "server, PGPASSWORD or ~/.pgpass for a PostgreSQL URI."
    )


def apply_environment_defaults(settings: RLHFSettings) -> None:
    """Set offline/telemetry defaults and PREFECT_HOME; never overrides what the user set.

    Must run before prefect is imported: Prefect reads its settings at import time.
    """
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(settings.resolved_prefect_home()))
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
