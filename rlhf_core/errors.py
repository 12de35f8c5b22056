"""Errors that are the user's to fix, as opposed to bugs.

A ``UserError`` says what is wrong with what the user gave us (the spec, a data row, a model source, a
failed check) in words that name the stage, field or row. The ``rlhf`` command prints its message alone,
without a traceback, and exits with ``EXIT_USER_ERROR``; anything else is a crash (``EXIT_CRASH``),
whose traceback stays in the Prefect log and is printed with ``--traceback``. Every error class of
the library that describes bad input derives from it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CRASH = 1  # a bug or an environment failure: one line, the traceback in the log or on --traceback
EXIT_USER_ERROR = 2  # spec, data, model source or a failed check: one message, no traceback
EXIT_GATE_FAILED = 3  # the pipeline ran to the end, but a promote stage's gate rejected its candidate
EXIT_REPRODUCTION_DIFFERS = 4  # `rlhf reproduce`: a stage's fingerprint (or the rebuilt weights) differs


class UserError(ValueError):
    """Bad input: the message alone tells the user what to fix (stage, field or row, what was expected)."""


class NonFiniteLossError(UserError):
    """A loss became NaN or infinite: training stops, the last good checkpoint stays, nothing is
    registered."""
