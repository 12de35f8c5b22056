"""The stage cache lives in MLflow: a finished stage run tagged with its fingerprint and output ref.

Because the record is an MLflow tag, a cache hit survives a wiped Prefect database, and any machine
pointed at the same tracking server sees it. A stage run that died before finishing (RUNNING, FAILED or
KILLED, with no output ref) is found by ``find_interrupted_run`` so the re-run resumes in the same run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import TypeAdapter

from registry.tracking import client
from rlhf_core.refs import StageOutput

FINGERPRINT_TAG = "rlhf.fingerprint"
OUTPUT_TAG = "rlhf.output_ref"
COMPLETE_TAG = "rlhf.complete"
ABANDONED_TAG = "rlhf.abandoned"  # an unfinished run that a later run chose not to resume

_OUTPUTS = TypeAdapter(dict[str, StageOutput])


@dataclass(frozen=True)
class CachedStage:
    run_id: str
    outputs: dict[str, StageOutput]
    metrics: dict[str, float]


def find_cached_stage(experiment_id: str, fingerprint: str) -> CachedStage | None:
    """The newest finished run that produced this fingerprint's outputs, if any."""
    runs = client().search_runs(
        [experiment_id],
        filter_string=f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}' and tags.`{COMPLETE_TAG}` = 'true' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    outputs = _OUTPUTS.validate_python(json.loads(run.data.tags[OUTPUT_TAG]))
    return CachedStage(run.info.run_id, outputs, dict(run.data.metrics))


def find_interrupted_run(experiment_id: str, fingerprint: str) -> str | None:
    """A stage run with this fingerprint that never completed (the process died or the stage failed)."""
    runs = client().search_runs(
        [experiment_id],
        filter_string=f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    live = [r for r in runs if r.data.tags.get(ABANDONED_TAG) != "true"]
    return live[0].info.run_id if live else None


def record_stage_outputs(run_id: str, outputs: dict[str, StageOutput]) -> None:
    """Mark a stage run complete with its outputs (the cache record). Call just before ending the run."""
    payload = json.dumps({k: v.model_dump(mode="json") for k, v in outputs.items()}, sort_keys=True)
    c = client()
    c.set_tag(run_id, OUTPUT_TAG, payload)
    c.set_tag(run_id, COMPLETE_TAG, "true")


def mark_abandoned(run_id: str) -> None:
    """An unfinished run that will not be resumed (no checkpoint): KILLED if it still says RUNNING."""
    c = client()
    if c.get_run(run_id).info.status == "RUNNING":
        c.set_terminated(run_id, status="KILLED")
    c.set_tag(run_id, ABANDONED_TAG, "true")
