"""What a person reads about a pipeline run in the two UIs, rendered as markdown.

- Prefect: every stage (ran, resumed or cached) leaves one markdown artifact on its task run (key
  ``<pipeline>-<stage>-result``) with its status, fingerprint, key metrics, registered model and links
  to its MLflow run and model version (and, for a result another pipeline produced, that pipeline
  and its pipeline run); the flow run gets one summary artifact (``<pipeline>-summary``).
- MLflow: the parent run's description is the spec's description and its stage list, then the results.

Links to MLflow pages are absolute in Prefect (``registry.tracking.ui_base_url``: ``rlhf ui``'s address
unless ``RLHF_MLFLOW_UI_URL`` or an HTTP tracking URI says otherwise) and relative inside MLflow.
Writing an artifact never fails a stage: a failure is logged as a warning.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

from registry import tracking
from rlhf_core.refs import ModelRef, StageOutput

DEFAULT_PREFECT_UI_URL = "http://127.0.0.1:4200"  # where ``rlhf ui`` serves the Prefect UI by default


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) made of ``parts``."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def prefect_ui_base() -> str:
    return os.environ.get("RLHF_PREFECT_UI_URL", DEFAULT_PREFECT_UI_URL).rstrip("/")


def prefect_flow_run_url(flow_run_id: str) -> str:
    return f"{prefect_ui_base()}/runs/flow-run/{flow_run_id}"


def registered_models(outputs: dict[str, StageOutput]) -> list[ModelRef]:
    return [o for o in outputs.values() if isinstance(o, ModelRef) and o.registered_name]


def format_value(value: float) -> str:
    return f"{value:.4g}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def stage_markdown(outcome, experiment_id: str, mlflow_base: str | None) -> str:
    """The Prefect artifact of one stage outcome (``runtime.stage_execution.StageOutcome``).

    ``mlflow_base`` None gives relative links (for text shown inside the MLflow UI).
    """

    def link(page: str) -> str:
        return tracking.ui_url(mlflow_base, page) if mlflow_base else page

    seconds = f" in {outcome.seconds:.1f} s" if outcome.seconds else ""
    lines = [
        f"### Stage `{outcome.stage}` ({outcome.kind}): {status_text(outcome)}{seconds}",
        "",
        "| | |",
        "|---|---|",
        f"| status | **{outcome.status}**{_status_note(outcome)} |",
        f"| fingerprint | `{outcome.fingerprint[:16]}` |",
        f"| MLflow run | [{outcome.run_id}]({link(tracking.run_page(experiment_id, outcome.run_id))}) |",
    ]
    if (origin := outcome.origin) is not None:
        pipeline_run = (
            f" · [pipeline run]({link(tracking.run_page(origin.experiment_id, origin.pipeline_run_id))})"
            if origin.pipeline_run_id
            else ""
        )
        lines.append(f"| produced by | pipeline `{_escape(origin.pipeline)}`{pipeline_run} |")
    for ref in registered_models(outcome.outputs):
        page = tracking.model_version_page(ref.registered_name, ref.registered_version)
        lines.append(
            f"| registered model | [{ref.registered_name} v{ref.registered_version}]({link(page)})"
            f" · `models:/{ref.registered_name}/{ref.registered_version}` |"
        )
    if outcome.metrics:
        lines += ["", "| key metric | value |", "|---|---|"]
        lines += [f"| {_escape(k)} | {format_value(v)} |" for k, v in outcome.metrics.items()]
    return "\n".join(lines) + "\n"


def status_text(outcome) -> str:
    """'ran', 'resumed', 'cached', or with another pipeline's run 'cached from pipeline quickstart'."""
    return f"{outcome.status} {outcome.origin_text()}".strip()


def _status_note(outcome) -> str:
    if outcome.origin is not None:
        return f" ({outcome.origin_text()})"
    return " (from an earlier run)" if outcome.status == "cached" else ""


def stage_summary_line(outcome) -> str:
    """One line: 'sft: ran, final_train_loss=1.23, registered e2e-sft v1'."""
    parts = [f"{outcome.stage}: {status_text(outcome)}"]
    parts += [f"{k}={format_value(v)}" for k, v in list(outcome.metrics.items())[:3]]
    if outcome.registered:
        parts.append(f"registered {outcome.registered}")
    return ", ".join(parts)


def pipeline_description(spec, spec_digest: str, prefect_url: str | None) -> str:
    """The parent run's description while the pipeline runs: what it is for and its stages."""
    lines = [spec.description.strip() or f"Pipeline `{spec.name}`.", "", "**Stages** (in order):", ""]
    lines += [f"- `{name}` (base model)" for name in spec.models]
    lines += [f"- `{name}` ({spec.stages[name].kind})" for name in spec.topological_order()]
    lines += ["", f"Spec digest `{spec_digest[:12]}` (artifact `resolved_spec.yaml`)."]
    if prefect_url:
        lines.append(f"Prefect flow run: [{prefect_url}]({prefect_url})")
    return "\n".join(lines) + "\n"


def results_markdown(outcomes: Iterable, experiment_id: str, failure: str | None = None) -> str:
    """The results section of the parent run's description (relative links: it is shown in MLflow)."""
    lines = ["", "## Results", "", "| stage | kind | status | key metrics | run | registered model |"]
    lines.append("|---|---|---|---|---|---|")
    for o in outcomes:
        metrics = "<br>".join(f"{_escape(k)}={format_value(v)}" for k, v in o.metrics.items())
        models = ", ".join(
            f"[{r.registered_name} v{r.registered_version}]"
            f"({tracking.model_version_page(r.registered_name, r.registered_version)})"
            for r in registered_models(o.outputs)
        )
        run = f"[{o.run_id[:8]}]({tracking.run_page(o.experiment_of_run(experiment_id), o.run_id)})"
        status = _escape(status_text(o))
        lines.append(f"| `{o.stage}` | {o.kind} | {status} | {metrics} | {run} | {models} |")
    if failure:
        lines += ["", f"**Failed**: {_escape(failure)}"]
    return "\n".join(lines) + "\n"


def absolute_links(markdown: str, mlflow_base: str) -> str:
    """Relative MLflow UI links (``](#/...)``) made absolute, for text shown outside MLflow."""
    return re.sub(r"\]\((#/[^)\s]*)\)", lambda m: f"]({tracking.ui_url(mlflow_base, m.group(1))})", markdown)


def summary_metrics(outcomes: Iterable) -> dict[str, float]:
    """Each stage's key metrics as ``<stage>/<metric>`` (MLflow metric names allow [/\\w.\\- :])."""
    return {
        re.sub(r"[^/\w.\- :]", "_", f"{o.stage}/{k}"): float(v)
        for o in outcomes
        for k, v in o.metrics.items()
    }


def create_markdown_artifact(markdown: str, key: str, description: str) -> None:
    """A Prefect markdown artifact on the current task or flow run; outside a Prefect run, nothing.
    Never raises: a report that cannot be written is a warning, not a failed stage."""
    from prefect.artifacts import create_markdown_artifact as create
    from prefect.context import FlowRunContext, TaskRunContext

    if TaskRunContext.get() is None and FlowRunContext.get() is None:
        return
    try:
        create(markdown, key=key, description=description)
    except Exception as exc:  # noqa: BLE001 - the stage's result stands without its report
        logging.getLogger("rlhf").warning("could not write the Prefect artifact %s: %s", key, exc)
