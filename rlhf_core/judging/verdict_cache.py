"""An on-disk cache of judge answers, so a re-run asks the endpoint nothing it has asked before.

One SQLite file (``verdicts.sqlite``) in the directory the caller gives, e.g. ``<home>/cache/judge``.
Each row maps ``sha256(judge identity, system text, prompt)`` to the judge's answer text. The identity
is the model name and its generation settings (temperature, max_tokens: a shorter limit truncates
verdicts), never the URL: the same model behind another address answers the same. Several processes
may share the file: WAL journalling lets readers run beside one writer, and a busy timeout makes
writers wait their turn instead of failing. The first answer stored for a key is kept.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

CACHE_FILE = "verdicts.sqlite"
BUSY_TIMEOUT_MS = 60_000
LOOKUP_CHUNK = 500  # keys per SELECT, under SQLite's bound-parameter limit


def verdict_key(judge_identity: str, system: str | None, prompt: str) -> str:
    """sha256 over the judge identity, the system text and the full prompt (JSON keeps parts apart)."""
    return hashlib.sha256(json.dumps([judge_identity, system or "", prompt]).encode()).hexdigest()


class VerdictCache:
    """Judge answers by :func:`verdict_key`, in ``directory/verdicts.sqlite`` (created on first use)."""

    def __init__(self, directory: Path | str) -> None:
        self.path = Path(directory) / CACHE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, output TEXT NOT NULL)")

    def __repr__(self) -> str:
        return f"VerdictCache({str(self.path)!r})"

    def lookup(self, judge_identity: str, system: str | None, prompts: Sequence[str]) -> list[str | None]:
        """The stored answer per prompt, None where there is none yet."""
        keys = [verdict_key(judge_identity, system, p) for p in prompts]
        found: dict[str, str] = {}
        with self._connect() as db:
            for start in range(0, len(keys), LOOKUP_CHUNK):
                chunk = keys[start : start + LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update(db.execute(f"SELECT key, output FROM verdicts WHERE key IN ({marks})", chunk))
        return [found.get(k) for k in keys]

    def store(
        self, judge_identity: str, system: str | None, prompts: Sequence[str], outputs: Sequence[str]
    ) -> None:
        """Keep each answer under its prompt's key; a key stored before keeps its first answer."""
        rows = [(verdict_key(judge_identity, system, p), o) for p, o in zip(prompts, outputs, strict=True)]
        with self._connect() as db:
            db.executemany("INSERT OR IGNORE INTO verdicts (key, output) VALUES (?, ?)", rows)

    def __len__(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One short-lived connection per operation (safe across threads and forks), committed on exit."""
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            with db:
                yield db
        finally:
            db.close()
