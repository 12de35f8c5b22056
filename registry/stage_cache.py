"""The stage cache lives in MLflow: a finished stage run tagged with its fingerprint and output ref.

Because the record is an MLflow tag, a cache hit survives a wiped Prefect database, and any machine
pointed at the same tracking server sees it. A stage run that died before finishing (RUNNING, FAILED or
KILLED, with no output ref) is found by ``find_interrupted_run`` so the re-run resumes in the same run.

Where results come from: every experiment of the tracking store (the home's SQLite store, or the shared
tracking server), not only the pipeline's own. A fingerprint already hashes everything a stage's output
depends on (config, input digests, code, library versions, seed; not the pipeline's or the stage's
name), so a finished run with that fingerprint in another pipeline's experiment is the same result.
When several runs hold it, the pipeline's own experiment wins, then the newest. The same rule holds for
resume: an interrupted run with the fingerprint in another experiment is the same work, and is resumed
(it stays in its experiment; the fingerprint lock keeps two pipelines from training it at once). A run
or experiment deleted in MLflow is no longer found; ``--force STAGE`` re-runs a stage regardless.

One lookup is two requests, whatever the number of experiments: the list of active experiments, then
one ``search_runs`` over all of their ids with the fingerprint as a tag filter. (MLflow's fluent
``search_runs(search_all_experiments=True)`` does the same; an empty ``experiment_ids`` list matches
no run, on SQLite and on a tracking server alike.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mlflow.entities import Run, ViewType
from pydantic import TypeAdapter

from registry.tracking import client
from rlhf_core.refs import StageOutput

FINGERPRINT_TAG = "rlhf.fingerprint"
OUTPUT_TAG = "rlhf.output_ref"
COMPLETE_TAG = "rlhf.complete"
ABANDONED_TAG = "rlhf.abandoned"  # an unfinished run that a later run chose not to resume
PIPELINE_RUN_TAG = "rlhf.pipeline_run_id"
MAX_CANDIDATES = 100  # runs of one fingerprint looked at per lookup (one per forced re-run, in practice)

_OUTPUTS = TypeAdapter(dict[str, StageOutput])


@dataclass(frozen=True)
class RunOrigin:
    """Where a stage run lives: its experiment (named after the pipeline that made it) and pipeline run."""

    run_id: str
    experiment_id: str
    pipeline: str  # the experiment's name: a pipeline's experiment is named after the pipeline
    pipeline_run_id: str  # the pipeline run that ran (or last resumed) it; "" if untagged


@dataclass(frozen=True)
class CachedStage:
    run_id: str
    outputs: dict[str, StageOutput]
    metrics: dict[str, float]
    origin: RunOrigin


def active_experiments() -> dict[str, str]:
    """Id -> name of every active experiment in the tracking store (all pages)."""
    c, found, token = client(), {}, None
    while True:
        page = c.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        found.update({e.experiment_id: e.name for e in page})
        token = page.token
        if not token:
            return found


def search_all_experiments(
    filter_string: str, order_by: list[str], max_results: int, prefer: str | None = None
) -> tuple[list[Run], dict[str, str]]:
    """Runs matching ``filter_string`` in any active experiment, in ``order_by`` order except that runs
    of the experiment ``prefer`` come first; with the experiments' names by id."""
    experiments = active_experiments()
    if not experiments:
        return [], experiments
    runs = client().search_runs(
        list(experiments), filter_string=filter_string, order_by=order_by, max_results=max_results
    )
    return sorted(runs, key=lambda r: r.info.experiment_id != prefer), experiments  # stable: keeps order


def _origin(run: Run, experiments: dict[str, str]) -> RunOrigin:
    experiment_id = run.info.experiment_id
    name = experiments.get(experiment_id) or client().get_experiment(experiment_id).name
    return RunOrigin(run.info.run_id, experiment_id, name, run.data.tags.get(PIPELINE_RUN_TAG, ""))


def run_origin(run_id: str) -> RunOrigin:
    """The experiment and pipeline run of one run."""
    run = client().get_run(run_id)
    return _origin(run, {})


def find_cached_stage(experiment_id: str | None, fingerprint: str) -> CachedStage | None:
    """The finished run that produced this fingerprint's outputs, in any experiment: the pipeline's own
    experiment ``experiment_id`` first (None: it has none yet), then the newest."""
    runs, experiments = search_all_experiments(
        f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}' and tags.`{COMPLETE_TAG}` = 'true' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"],
        max_results=MAX_CANDIDATES,
        prefer=experiment_id,
    )
    if not runs:
        return None
    run = runs[0]
    outputs = _OUTPUTS.validate_python(json.loads(run.data.tags[OUTPUT_TAG]))
    return CachedStage(run.info.run_id, outputs, dict(run.data.metrics), _origin(run, experiments))


def find_interrupted_run(experiment_id: str | None, fingerprint: str) -> str | None:
    """A stage run with this fingerprint that never completed (the process died or the stage failed), in
    any experiment: the pipeline's own first, then the newest; runs marked abandoned are skipped."""
    runs, _ = search_all_experiments(
        f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=MAX_CANDIDATES,
        prefer=experiment_id,
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
