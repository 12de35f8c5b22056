"""The ``rlhf`` command: validate, plan and run pipeline specs.

Prefect and MLflow are imported only after the offline/telemetry defaults and PREFECT_HOME are set
(Prefect reads its settings at import time), which is why those imports live inside the commands.

Exit statuses (``rlhf_core.errors``): 0 success; 2 a user error (spec, data, model source, a failed
check, a bad option), printed as its message alone; 3 the pipeline ran to the end but a promote
stage's gate rejected its candidate; 4 ``rlhf reproduce`` found a stage (or the rebuilt weights) that
differs from the registry's record; 1 anything else (a crash). ``--traceback`` or
``RLHF_TRACEBACK=1`` shows the full traceback of either.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cli.console import console, error, exit_status, settings_for
from cli.console_tracebacks import configure_console_tracebacks
from rlhf_core.errors import EXIT_GATE_FAILED, EXIT_USER_ERROR, UserError
from rlhf_core.refs import PromotionRef

if TYPE_CHECKING:  # the spec package loads in the commands that read a spec, not for --help or models
    from rlhf_core.settings import RLHFSettings
    from rlhf_core.spec import PipelineSpec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Declarative RLHF pipelines: one YAML spec, Prefect flows, MLflow lineage.",
)
SpecArg = Annotated[Path, typer.Argument(help="Pipeline spec (YAML).", exists=False)]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a spec field: a.b.c=value (repeatable).")
]
ForceOpt = Annotated[
    list[str] | None, typer.Option("--force", help="Re-run this stage and all downstream (repeatable).")
]
HomeOpt = Annotated[Path | None, typer.Option("--home", help="State dir (default $RLHF_HOME or ./.rlhf).")]
TracebackOpt = Annotated[
    bool,
    typer.Option(
        "--traceback",
        envvar="RLHF_TRACEBACK",
        help="Show full tracebacks, also for user errors (spec, data, model source, failed checks).",
    ),
]


ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile",
        envvar="RLHF_PROFILE",
        help="Compute profile: where each stage runs (work pools, processes); 'local' runs all in-process.",
    ),
]
ProfilesOpt = Annotated[
    Path | None,
    typer.Option("--profiles", help="Profile file (default: profiles.yaml next to the spec, else in ./)."),
]


def load_spec(spec_path: Path, overrides: list[str]) -> PipelineSpec:
    from rlhf_core.spec import load_spec as load

    return load(spec_path, overrides)


def _load(
    spec_path: Path,
    overrides: list[str] | None,
    show_traceback: bool,
    profile: str | None = None,
    profiles: Path | None = None,
) -> PipelineSpec:
    """The validated spec, with ``--set`` overrides and the compute profile applied."""
    from rlhf_core.spec.loading import find_profile_file, resolve_profile

    with exit_status(show_traceback, f"{spec_path}: "):
        spec = load_spec(spec_path, overrides or [])
        if profile is not None:
            chosen = resolve_profile(profile, find_profile_file(spec_path, profiles))
            spec = spec.with_profile(chosen, profile)
        return spec


def _forced(spec: PipelineSpec, force: list[str] | None) -> set[str]:
    from flows.pipeline import forced_stages

    try:
        return forced_stages(spec, force or [])
    except UserError as exc:  # an unknown stage name is the user's to fix
        error(str(exc))
        raise typer.Exit(EXIT_USER_ERROR) from None


def _check_sources(spec: PipelineSpec) -> None:
    """Fail before running when a local data file lacks the columns its format needs."""
    from rlhf_core.data.loading import load_records, read_rows
    from rlhf_core.data.schemas import DataValidationError
    from rlhf_core.data.task_presets import task_rows
    from rlhf_core.spec import SpecError

    problems = []
    for name, stage in spec.stages.items():
        source = getattr(stage, "source", None)
        if source is not None and source.file is not None:
            file = source.file
            try:
                if file.task is not None:  # the preset's columns, on the first row
                    rows, columns = read_rows(file.path, limit=1)
                    task_rows(rows, file.task, columns=file.columns, available=columns, source=file.path)
                else:
                    load_records(file.path, fmt=file.format, column_map=file.columns, limit=1)
            except (DataValidationError, OSError, ValueError) as exc:
                problems.append(f"stage '{name}', field source.file: {exc}")
    if problems:
        raise SpecError(problems)


@app.command()
def validate(
    spec_path: SpecArg,
    set_: SetOpt = None,
    profile: ProfileOpt = None,
    profiles: ProfilesOpt = None,
    traceback_: TracebackOpt = False,
) -> None:
    """Check a spec (fields, types, references, cycles, data columns) without running anything."""
    spec = _load(spec_path, set_, traceback_, profile, profiles)
    with exit_status(traceback_):
        _check_sources(spec)
    console.print(
        f"[green]ok[/green]: pipeline '{spec.name}', {len(spec.models)} model(s), "
        f"{len(spec.stages)} stage(s): {' -> '.join(spec.topological_order())}"
    )


@app.command()
def schema() -> None:
    """Print the JSON Schema of a pipeline spec (every field with its description and default)."""
    import json

    from rlhf_core.spec.loading import pipeline_json_schema

    typer.echo(json.dumps(pipeline_json_schema(), indent=2))


def _prepare(
    spec_path: Path,
    set_: list[str] | None,
    force: list[str] | None,
    home: Path | None,
    traceback_: bool,
    profile: str | None = None,
    profiles: Path | None = None,
) -> tuple[PipelineSpec, RLHFSettings, set[str]]:
    """The validated spec (data columns checked), the settings, and the stages ``--force`` re-runs."""
    spec = _load(spec_path, set_, traceback_, profile, profiles)
    with exit_status(traceback_):
        _check_sources(spec)
        settings = settings_for(home)
        forced = _forced(spec, force)
    return spec, settings, forced


@app.command()
def plan(
    spec_path: SpecArg,
    set_: SetOpt = None,
    force: ForceOpt = None,
    home: HomeOpt = None,
    profile: ProfileOpt = None,
    profiles: ProfilesOpt = None,
    traceback_: TracebackOpt = False,
) -> None:
    """Say which stages would run, where, and which would be taken from cache."""
    spec, settings, forced = _prepare(spec_path, set_, force, home, traceback_, profile, profiles)
    from flows.plan import plan_pipeline

    table = Table(title=f"plan: {spec.name}")
    for column in ("stage", "kind", "action", "why", "where", "fingerprint", "cached run"):
        table.add_column(column)
    with exit_status(traceback_, f"plan of pipeline '{spec.name}' failed: "):
        plans = plan_pipeline(spec, forced, str(settings.resolved_home()))
    for p in plans:
        table.add_row(
            p.stage, p.kind, p.action, p.reason, p.where, (p.fingerprint or "")[:12], p.run_id or ""
        )
    console.print(table)
    for p in plans:
        if p.filled:
            values = ", ".join(f"{path}={value}" for path, value in p.filled.items())
            console.print(f"{p.stage}: defaults in effect: {values}", highlight=False, soft_wrap=True)


@app.command()
def run(
    spec_path: SpecArg,
    set_: SetOpt = None,
    force: ForceOpt = None,
    home: HomeOpt = None,
    profile: ProfileOpt = None,
    profiles: ProfilesOpt = None,
    traceback_: TracebackOpt = False,
) -> None:
    """Run a pipeline: cached stages are skipped, interrupted ones resume; stages whose compute names
    a work pool run on it (rlhf deploy creates the stage runners there)."""
    spec, settings, _ = _prepare(spec_path, set_, force, home, traceback_, profile, profiles)
    from cli.live_view import live_pipeline_view
    from cli.prefect_database import initialize_temporary_server_database
    from flows.pipeline import run_pipeline

    configure_console_tracebacks(show_user_errors=traceback_)
    with exit_status(traceback_, f"pipeline '{spec.name}' failed: "):
        require_server_for_pools(spec, settings)
        initialize_temporary_server_database()  # runs started together on a fresh home must not race
        with live_pipeline_view(spec, console):  # on a terminal only; plain log lines otherwise
            outcomes = run_pipeline(spec, force=list(force or []), home=str(settings.resolved_home()))
    print_summary(spec.name, outcomes, settings)
    rejected = [d for d in promotion_decisions(outcomes) if not d.passed]
    if rejected:
        for d in rejected:
            error(
                f"promotion gate of stage '{d.stage}' rejected {d.registered_name} v{d.registered_version}: "
                f"{d.reason} (no alias moved; exit status {EXIT_GATE_FAILED})"
            )
        raise typer.Exit(EXIT_GATE_FAILED)


@app.command()
def deploy(
    spec_path: SpecArg,
    pool: Annotated[
        str | None,
        typer.Option(
            "--pool", help="Work pool of the pipeline's own flow (default: the profile's pipeline_pool)."
        ),
    ] = None,
    schedule: Annotated[
        str | None, typer.Option("--schedule", help="Cron schedule of the pipeline, e.g. '0 3 * * *'.")
    ] = None,
    timezone: Annotated[str | None, typer.Option("--timezone", help="Time zone of --schedule (UTC).")] = None,
    set_: SetOpt = None,
    home: HomeOpt = None,
    profile: ProfileOpt = None,
    profiles: ProfilesOpt = None,
    traceback_: TracebackOpt = False,
) -> None:
    """Create the pipeline's deployment and its stage runners on the Prefect server (PREFECT_API_URL),
    so that runs can be scheduled and started from the Prefect UI."""
    from rlhf_core.spec import apply_override, read_yaml
    from rlhf_core.spec.loading import find_profile_file, resolve_profile

    spec = _load(spec_path, set_, traceback_, profile, profiles)
    with exit_status(traceback_, f"deploy of pipeline '{spec.name}' failed: "):
        settings = settings_for(home)
        raw = read_yaml(spec_path)
        for override in set_ or []:
            apply_override(raw, override)
        chosen = resolve_profile(profile, find_profile_file(spec_path, profiles)) if profile else None
        pipeline_pool = pool or (chosen.pipeline_pool if chosen else None)
        if pipeline_pool is None:
            raise UserError("say which work pool runs the pipeline's own flow: --pool NAME (or pipeline_pool "
                            "in the profile)")  # fmt: skip
        from flows.deploy import deploy_pipeline

        uri = settings.resolved_tracking_uri()
        deployed = deploy_pipeline(
            spec,
            raw,
            pipeline_pool=pipeline_pool,
            home=str(settings.resolved_home()),
            schedule=schedule,
            timezone=timezone,
            tracking_uri=uri if settings.tracking_uri else None,
        )
    table = Table(title=f"deployed: {spec.name}")
    for column in ("deployment", "work pool", "schedule", "id"):
        table.add_column(column)
    for d in deployed:
        table.add_row(d.name, d.pool, d.schedule or "", d.deployment_id)
    console.print(table)
    console.print(
        f"start a run: prefect deployment run 'rlhf-pipeline/{spec.name}', or from the Prefect UI "
        "(Deployments); each pool needs a worker: prefect worker start --pool NAME"
    )


def require_server_for_pools(spec: PipelineSpec, settings: RLHFSettings) -> None:
    """Stages on work pools need the Prefect server the pools and workers live on."""
    from flows.deploy import require_prefect_server, stage_pools

    pools = stage_pools(spec)
    if not pools:
        return
    require_prefect_server(f"pipeline '{spec.name}' runs stages on work pool(s) {', '.join(pools)}, which")
    uri = settings.resolved_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        error(
            f"note: stages on work pool(s) {', '.join(pools)} will write to the tracking store {uri}: their "
            "workers must see it (this machine, or a shared file system); for workers on other machines "
            "set RLHF_TRACKING_URI to an MLflow server (docs/scaling.md)"
        )


def promotion_decisions(outcomes) -> list[PromotionRef]:
    return [ref for o in outcomes for ref in o.outputs.values() if isinstance(ref, PromotionRef)]


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
        if o.origin is not None:  # another pipeline's run: say whose (its run id is in the next column)
            status += f"\n{o.origin_text()}"
        table.add_row(o.stage, o.kind, status, metrics, o.run_id, o.registered or _decision_cell(o))
    console.print(table)
    for d in promotion_decisions(outcomes):
        if d.passed:
            moved = f" (v{d.previous_version} is now the previous one)" if d.previous_version else ""
            console.print(
                f"[green]promoted[/green]: {d.registered_name} v{d.registered_version} is "
                f"'{d.alias}'{moved}; load it with models:/{d.registered_name}@{d.alias}"
            )
        else:
            console.print(f"[red]not promoted[/red]: {d.registered_name} v{d.registered_version}: {d.reason}")
    console.print(
        f"MLflow store: {settings.resolved_tracking_uri()}  "
        f"(both UIs: rlhf ui --home {settings.resolved_home()})"
    )


def _decision_cell(outcome) -> str:
    decisions = promotion_decisions([outcome])
    if not decisions:
        return ""
    d = decisions[0]
    verdict = f"{d.alias} -> v{d.registered_version}" if d.passed else "gate failed"
    return f"{d.registered_name} v{d.registered_version}: {verdict}"


from cli.model_commands import models_app  # noqa: E402  (rlhf models list/promote/rollback/history)

app.add_typer(models_app, name="models")

# --- commands from other modules (begin) ---
from cli.ui import ui  # noqa: E402  (rlhf ui: both UIs of the home on 127.0.0.1)

app.command()(ui)
from cli.reproduce import reproduce  # noqa: E402  (rlhf reproduce)

app.command()(reproduce)
from cli.pool_commands import pools_app  # noqa: E402  (rlhf pools create/template)

app.add_typer(pools_app, name="pools")
from cli.engine_commands import engine_app  # noqa: E402  (rlhf engine install/status)

app.add_typer(engine_app, name="engine")
from cli.serve_command import serve  # noqa: E402  (rlhf serve: an OpenAI-compatible endpoint for a model)

app.command()(serve)
# --- (end) ---


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
