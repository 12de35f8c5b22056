"""``rlhf models ...``: the Model Registry from the terminal: list versions, promote, roll back.

Each command points MLflow at the project's home (``--home`` / ``$RLHF_HOME``) first; MLflow is imported
only then (the offline defaults must be set before). Moves made here are recorded as ``manual`` in the
version tags and the registered model's alias history.
"""

from __future__ import annotations

import atexit
import gc
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.console import console
from cli.reproduce import lineage
from rlhf_core.settings import RLHFSettings, apply_environment_defaults

models_app = typer.Typer(
    no_args_is_help=True, help="Registered models: list versions, promote or roll back by hand, lineage."
)

HomeOpt = Annotated[Path | None, typer.Option("--home", help="State dir (default $RLHF_HOME or ./.rlhf).")]
AliasOpt = Annotated[str, typer.Option("--alias", help="Alias to move.")]
PreviousOpt = Annotated[
    str, typer.Option("--previous-alias", help="Alias kept on the version that held --alias before.")
]


@models_app.callback()
def _run_without_cyclic_gc(ctx: typer.Context) -> None:
    # Importing MLflow makes ~300k objects the cyclic GC tracks; it walks them again and again while
    # they load (~0.5 s here), then once more at interpreter exit (~0.7 s), for a command that lives
    # a few seconds and makes little cyclic garbage. So no collection while a models command runs (peak
    # memory measured the same), and what exists at exit is frozen out of the final collection (atexit
    # handlers and refcount frees still run). GC is back on when the command ends, for in-process callers.
    gc.disable()
    ctx.call_on_close(gc.enable)
    atexit.unregister(gc.freeze)  # once, however many commands ran in this process
    atexit.register(gc.freeze)


models_app.command("lineage")(lineage)  # rlhf models lineage <ref>: a version's chain upstream
LISTED_METRICS = ("eval/accuracy", "eval/pass_at_", "eval/win_rate/", "eval/reward/", "eval/kl_to_reference")


def connect(home: Path | None) -> RLHFSettings:
    """Settings of the home, with MLflow pointed at its tracking store."""
    settings = RLHFSettings(home=home) if home else RLHFSettings()
    apply_environment_defaults(settings)
    from registry import tracking

    tracking.configure(settings)
    return settings


def _fail(exc: Exception) -> None:
    typer.secho(str(exc), err=True, fg="red")
    raise typer.Exit(2) from None


@models_app.command("list")
def list_models(
    name: Annotated[str | None, typer.Argument(help="Only this registered model.")] = None,
    home: HomeOpt = None,
) -> None:
    """Registered models and versions with their aliases, stage, gate decision and key figures."""
    connect(home)
    from registry.promotion import RegistryError, version_summaries

    try:
        rows = version_summaries(name)
    except RegistryError as exc:
        _fail(exc)
    table = Table(title="registered models")
    for column in ("model", "version", "aliases", "stage", "created", "gate", "key figures"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(
            r.name, r.version, ", ".join(r.aliases), r.stage, r.created, r.gate, _key_figures(r.metrics)
        )
    console.print(table if rows else "no registered models in this home")


def _key_figures(metrics: dict[str, float]) -> str:
    shown = []
    for key in sorted(metrics):
        base = key.removeprefix("eval/")
        if key.startswith(LISTED_METRICS) and not key.endswith(("_ci_low", "_ci_high", "_n")):
            low, high = metrics.get(key + "_ci_low"), metrics.get(key + "_ci_high")
            interval = f" [{low:.3g}, {high:.3g}]" if low is not None and high is not None else ""
            shown.append(f"{base}={metrics[key]:.3g}{interval}")
    return "\n".join(shown)


@models_app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to promote.")],
    alias: AliasOpt = "champion",
    previous_alias: PreviousOpt = "previous-champion",
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the version's tags).")] = "",
    home: HomeOpt = None,
) -> None:
    """Move an alias (champion) to a version by hand, bypassing any gate; recorded as manual."""
    connect(home)
    from registry.promotion import RegistryError
    from registry.promotion import promote as promote_version

    tags = {"rlhf.promoted_reason": reason} if reason else {}
    try:
        previous = promote_version(
            name, version, alias=alias, previous_alias=previous_alias, by="manual", tags=tags
        )
    except RegistryError as exc:
        _fail(exc)
    _refresh_cards(name, [version, previous])
    moved = f"; v{previous} is now '{previous_alias}'" if previous else ""
    console.print(f"{name}: '{alias}' -> v{version}{moved}")


@models_app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    alias: AliasOpt = "champion",
    previous_alias: PreviousOpt = "previous-champion",
    home: HomeOpt = None,
) -> None:
    """Point the alias back at the previous champion; the demoted version is tagged as rolled back."""
    connect(home)
    from registry.promotion import RegistryError
    from registry.promotion import rollback as rollback_alias

    try:
        demoted, restored = rollback_alias(name, alias=alias, previous_alias=previous_alias, by="manual")
    except RegistryError as exc:
        _fail(exc)
    _refresh_cards(name, [demoted, restored])
    console.print(f"{name}: '{alias}' -> v{restored} (rolled back from v{demoted})")


@models_app.command()
def history(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    home: HomeOpt = None,
) -> None:
    """Every alias move of a registered model (promotions and rollbacks, by stage or by hand)."""
    connect(home)
    from registry.promotion import alias_history

    table = Table(title=f"alias history: {name}")
    for column in ("time", "action", "alias", "version", "from", "by"):
        table.add_column(column)
    for event in alias_history(name):
        table.add_row(
            *(str(event.get(k) or "") for k in ("time", "action", "alias", "version", "from", "by"))
        )
    console.print(table)


def _refresh_cards(name: str, versions: list[str | None]) -> None:
    """The model cards of the versions an alias move touched (they list aliases and the gate)."""
    from registry.model_cards import refresh_model_card

    for version in versions:
        if version:
            refresh_model_card(name, version)
