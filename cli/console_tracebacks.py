"""Which tracebacks reach the console: none for user errors, unless asked for.

Prefect's task and flow engines log a failure with its traceback (``logger.error(..., exc_info=True)``
and ``logger.exception("Encountered exception during execution: %r", exc)``). For a ``UserError`` (a bad
spec, data row or model source, a failed check) sixty lines of frames only bury the one line that says
what to fix. ``configure_console_tracebacks`` wraps the formatter of each console handler so that such a
record prints as its one-line message. The record itself is left whole: Prefect's API handler (the run's
logs in the Prefect UI) and any file handler still get the full traceback.

It also remembers which exceptions the console did show with a traceback, so the ``rlhf`` command can say
"traceback above" instead of printing it twice.
"""

from __future__ import annotations

import copy
import logging

from rlhf_core.errors import UserError

_shown_with_traceback: list[BaseException] = []  # kept alive, so identity checks stay meaningful


class _ConsoleFormatter(logging.Formatter):
    """Delegates to the handler's own formatter; drops the traceback of user-error records."""

    def __init__(self, inner: logging.Formatter, hide_user_errors: bool) -> None:
        super().__init__()
        self.inner = inner
        self.hide_user_errors = hide_user_errors

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UserError) and self.hide_user_errors:
            # A copy: handlers share the record, and the API and file handlers keep the traceback.
            record = copy.copy(record)
            record.exc_info, record.exc_text = None, None
        elif exc is not None:
            _shown_with_traceback.append(exc)
        return self.inner.format(record)


def console_handlers() -> list[logging.Handler]:
    """Handlers that write to a terminal stream (Prefect's console handler among them), not to files."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    found: dict[int, logging.Handler] = {}
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):  # placeholders in loggerDict have none
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                found[id(handler)] = handler
    return list(found.values())


def configure_console_tracebacks(show_user_errors: bool) -> None:
    """Print user errors on the console without their traceback (unless ``show_user_errors``).

    Sets up Prefect's logging first if nothing has yet (its handlers must exist to be wrapped); calling
    again only changes the choice.
    """
    from prefect.logging.configuration import ensure_logging_setup  # not at import: see cli/app.py

    ensure_logging_setup()
    for handler in console_handlers():
        configure_handler(handler, show_user_errors)


def configure_handler(handler: logging.Handler, show_user_errors: bool) -> None:
    """Wrap ``handler``'s formatter (once) so it prints user errors with or without their traceback."""
    formatter = handler.formatter
    if isinstance(formatter, _ConsoleFormatter):
        formatter.hide_user_errors = not show_user_errors
    else:
        handler.setFormatter(_ConsoleFormatter(formatter or logging.Formatter(), not show_user_errors))


def traceback_shown(exc: BaseException) -> bool:
    """Whether a console handler already printed ``exc`` with its traceback."""
    return any(shown is exc for shown in _shown_with_traceback)
