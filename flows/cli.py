"""The ``rlhf`` command: validate, plan and run pipeline specs.

Prefect and MLflow are imported only after the offline/telemetry defaults and PREFECT_HOME are set
(Prefect reads its settings at import time), which is why those imports live inside the commands.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from rlhf_core.settings import RLHFSettings, apply_environment_defaults
from rlhf_core.spec import PipelineSpec, SpecError, load_spec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Declarative RLHF pipelines: one YAML spec, Prefect flows, MLflow lineage.",
)
# Wide enough for run ids and metrics when output is not a terminal (CI logs, files).
console = Console(width=None if sys.stdout.isatty() else 160)


def _error(message: str) -> None:
    """Errors go to stderr unwrapped, so every line keeps its stage and field path intact."""
    typer.secho(message, err=True, fg="red")


SpecArg = Annotated[Path, typer.Argument(help="Pipeline spec (YAML).", exists=False)]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a spec field: a.b.c=value (repeatable).")
]
ForceOpt = Annotated[
    list[str] | None, typer.Option("--force", help="Re-run this stage and all downstream (repeatable).")
]
HomeOpt = Annotated[Path | None, typer.Option("--home", help="State dir (default $RLHF_HOME or ./.rlhf).")]


def _load(spec_path: Path, overrides: list[str] | None) -> PipelineSpec:
    try:
        return load_spec(spec_path, overrides or [])
    except SpecError as exc:
        _error(f"{spec_path}: {exc}")
        raise typer.Exit(2) from None


def _settings(home: Path | None) -> RLHFSettings:
    settings = RLHFSettings(home=home) if home else RLHFSettings()
    apply_environment_defaults(settings)
    return settings


def _check_sources(spec: PipelineSpec) -> None:
    """Fail before running when a local data file lacks the columns its format needs."""
    from rlhf_core.data.loading import load_records
    from rlhf_core.data.schemas import DataValidationError

    problems = []
    for name, stage in spec.stages.items():
        source = getattr(stage, "source", None)
        if source is not None and source.file is not None:
            try:
                load_records(
                    source.file.path, fmt=source.file.format, column_map=source.file.columns, limit=1
                )
            except (DataValidationError, OSError, ValueError) as exc:
                problems.append(f"stage '{name}', field source.file: {exc}")
    if problems:
        _error(str(SpecError(problems)))
        raise typer.Exit(2)


@app.command()
def validate(spec_path: SpecArg, set_: SetOpt = None) -> None:
    """Check a spec (fields, types, references, cycles, data columns) without running anything."""
    spec = _load(spec_path, set_)
    _check_sources(spec)
    console.print(
        f"[green]ok[/green]: pipeline '{spec.name}', {len(spec.models)} model(s), "
        f"{len(spec.stages)} stage(s): {' -> '.join(spec.topological_order())}"
    )


@app.command()
def schema() -> None:
    """Print the JSON Schema of a pipeline spec (every field with its description and default)."""
    import json

    typer.echo(json.dumps(PipelineSpec.model_json_schema(), indent=2))


@app.command()
def plan(spec_path: SpecArg, set_: SetOpt = None, force: ForceOpt = None, home: HomeOpt = None) -> None:
    """Say which stages would run and which would be taken from cache."""
    spec = _load(spec_path, set_)
    _check_sources(spec)
    settings = _settings(home)
    from flows.pipeline import forced_stages
    from flows.plan import plan_pipeline

    try:
        forced = forced_stages(spec, force or [])
    except ValueError as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    table = Table(title=f"plan: {spec.name}")
    for column in ("stage", "kind", "action", "why", "fingerprint", "cached run"):
        table.add_column(column)
    for p in plan_pipeline(spec, forced, str(settings.resolved_home())):
        table.add_row(p.stage, p.kind, p.action, p.reason, (p.fingerprint or "")[:12], p.run_id or "")
    console.print(table)


@app.command()
def run(spec_path: SpecArg, set_: SetOpt = None, force: ForceOpt = None, home: HomeOpt = None) -> None:
    """Run a pipeline: cached stages are skipped, interrupted ones resume."""
    spec = _load(spec_path, set_)
    _check_sources(spec)
    settings = _settings(home)
    from flows.pipeline import forced_stages, run_pipeline

    try:
        forced_stages(spec, force or [])
    except ValueError as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    try:
        outcomes = run_pipeline(spec, force=list(force or []), home=str(settings.resolved_home()))
    except Exception as exc:  # the flow's log above has the traceback; end with the one line that matters
        _error(f"pipeline '{spec.name}' failed: {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    print_summary(spec.name, outcomes, settings)


def print_summary(name: str, outcomes, settings: RLHFSettings) -> None:
    table = Table(title=f"pipeline {name}")
    for column in ("stage", "kind", "status", "key metrics", "MLflow run", "registered model"):
        table.add_column(column, overflow="fold")
    for o in outcomes:
        metrics = "\n".join(f"{k}={v:.4g}" for k, v in o.metrics.items())
        status = {
            "ran": "[green]ran[/green]",
            "resumed": "[yellow]resumed[/yellow]",
            "cached": "[cyan]cached[/cyan]",
        }.get(o.status, o.status)
        table.add_row(o.stage, o.kind, status, metrics, o.run_id, o.registered or "")
    console.print(table)
    console.print(
        f"MLflow store: {settings.resolved_tracking_uri()}  (UI: mlflow ui --backend-store-uri "
        f"{settings.resolved_tracking_uri()})"
    )


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
