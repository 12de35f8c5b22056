"""What every ``rlhf`` command shares: the console it prints to, how an error becomes an exit status,
and the home's settings (with the offline defaults applied before anything imports Prefect or MLflow).

Exit statuses (``rlhf_core.errors``): 0 success; 2 a user error (spec, data, model source, a failed
check, a bad option), printed as its message alone; 3 the pipeline ran to the end but a promote
stage's gate rejected its candidate; 4 ``rlhf reproduce`` found a stage (or the rebuilt weights) that
differs from the registry's record; 1 anything else (a crash). ``--traceback`` or
``RLHF_TRACEBACK=1`` shows the full traceback of either.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from cli.console_tracebacks import traceback_shown
from rlhf_core.errors import EXIT_CRASH, EXIT_USER_ERROR, UserError
from rlhf_core.settings import RLHFSettings, apply_environment_defaults

# Wide enough for run ids and metrics when output is not a terminal (CI logs, files).
console = Console(width=None if sys.stdout.isatty() else 160)


def error(message: str) -> None:
    """Errors go to stderr unwrapped, so every line keeps its stage and field path intact."""
    typer.secho(message, err=True, fg="red")


@contextmanager
def exit_status(show_traceback: bool, context: str = "") -> Iterator[None]:
    """Exit 2 with ``context`` + the message of a UserError; exit 1 with a short line for anything else.

    A traceback is printed only on request, and not twice: Prefect's log may already have shown it.
    """
    try:
        yield
    except (typer.Exit, typer.Abort, typer.exceptions.TyperException):
        raise  # they carry their own exit status
    except Exception as exc:
        shown = traceback_shown(exc)
        if show_traceback and not shown:
            traceback.print_exception(exc)
        if isinstance(exc, UserError):
            error(f"{context}{exc}")
            raise typer.Exit(EXIT_USER_ERROR) from None
        error(f"{context}{type(exc).__name__}: {exc}")
        if shown or show_traceback:
            error("Unexpected error (exit status 1): see the traceback above.")
        else:
            error("Unexpected error (exit status 1): for its traceback, run again with --traceback.")
        raise typer.Exit(EXIT_CRASH) from None


def settings_for(home: Path | None) -> RLHFSettings:
    settings = RLHFSettings(home=home) if home else RLHFSettings()
    apply_environment_defaults(settings)
    return settings
