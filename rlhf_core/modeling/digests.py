"""Content digests of saved model directories (pure hashing: importing this loads no torch).

Digests identify model contents in refs and fingerprints, so a cache lookup never has to load a model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def tokenizer_digest(directory: Path) -> str:
    """sha256 over the tokenizer files (vocabulary, special tokens, chat template)."""
    return _files_digest(Path(directory), [f for f in TOKENIZER_FILES if (Path(directory) / f).exists()])


def model_digest(directory: Path) -> str:
    """sha256 over every file of a saved model directory."""
    directory = Path(directory)
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    return _files_digest(directory, files)


def _files_digest(directory: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        with open(directory / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
