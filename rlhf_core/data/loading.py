"""Loading rows from local files or the Hugging Face Hub, writing JSONL, splitting, digests.

``load_records`` returns plain rows with our column names; validation of each row is
left to :func:`rlhf_core.data.schemas.validate_records`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from rlhf_core.data.column_paths import MissingColumn, column_value, is_nested, path_steps
from rlhf_core.data.schemas import REQUIRED_COLUMNS, DatasetFormat, DataValidationError

_CHUNK = 1 << 20
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes


def read_jsonl(path: Path | str) -> list[dict]:
    """One JSON object per non-blank line; a bad line raises :class:`DataValidationError`."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataValidationError(str(path), f"valid JSON ({e.msg})", line=lineno) from e
            if not isinstance(row, dict):
                raise DataValidationError(str(path), f"a JSON object, got {type(row).__name__}", line=lineno)
            rows.append(row)
    return rows


def write_jsonl(records: list[dict], path: Path | str) -> None:
    """Write rows as JSONL atomically (temp file, then ``os.replace``), columns sorted.

    Values keep their own key order: chat templates render nested objects as text (a tool's declaration,
    a call's arguments), so a reordered object would show the model other text than at sampling time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in records:
                f.write(
                    json.dumps({column: row[column] for column in sorted(row)}, ensure_ascii=False) + "\n"
                )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataValidationError(str(path), f"valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, list):
        raise DataValidationError(str(path), f"a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataValidationError(str(path), f"a JSON object, got {type(row).__name__}", row=i)
    return data


def _read_local_file(path: Path) -> tuple[list[dict], list[str] | None]:
    """Rows and, when the format has a schema, its column names."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path), None
    if suffix == ".json":
        return _read_json(path), None
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of `datasets`

        table = pq.read_table(path)
        return table.to_pylist(), table.column_names
    raise DataValidationError(str(path), f"a .jsonl, .json or .parquet file, got {suffix or 'no suffix'!r}")


def _dataset_rows(ds: Any, limit: int | None) -> tuple[list[dict], list[str]]:
    """Rows of a ``datasets.Dataset``, reading at most ``limit`` of them."""
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_list(), list(ds.column_names)


def _read_saved_dataset(path: Path, split: str, limit: int | None) -> tuple[list[dict], list[str]]:
    """A directory written by ``save_to_disk``: a Dataset, or a DatasetDict indexed by ``split``."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataValidationError(str(path), f"a split named {split!r}; available: {sorted(ds)}")
        ds = ds[split]
    return _dataset_rows(ds, limit)


def _read_hub(
    name: str, config: str | None, split: str, revision: str | None, limit: int | None
) -> tuple[list[dict], list[str]]:
    import datasets

    ds = datasets.load_dataset(name, config, split=split, revision=revision)
    return _dataset_rows(ds, limit)


def _columns_of(rows: list[dict]) -> list[str]:
    """Union of keys over all rows, in first-seen order."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _source_column(theirs: str, columns: list[str]) -> str | None:
    """The source column ``theirs`` reads: itself, or the first step of a nested path; None if absent."""
    if theirs in columns:
        return theirs
    if is_nested(theirs):
        first = path_steps(theirs)[0]
        return first if isinstance(first, str) and first in columns else None
    return None


def check_column_map(columns: list[str], column_map: dict[str, str], source: str) -> None:
    """Every mapped column (or the column a nested path starts in) exists, and no column of ours is
    both mapped and already present under its own name."""
    for ours, theirs in column_map.items():
        try:
            found = _source_column(theirs, columns)
        except ValueError as e:
            raise DataValidationError(source, f"a column name or path for {ours!r} ({e})", field=ours) from e
        if found is None:
            raise DataValidationError(
                source, f"column {theirs!r} (mapped to {ours!r}); available columns: {columns}", field=theirs
            )
        if ours != theirs and ours in columns and ours not in column_map.values():
            raise DataValidationError(
                source,
                f"one column for {ours!r}, but both {ours!r} and {theirs!r} exist; drop one",
                field=ours,
            )


def map_row(row: dict, column_map: dict[str, str]) -> dict:
    """The row with each of OUR columns set from THEIR column or path (ours -> theirs).

    A top-level column mapped once is renamed; one mapped to several of our names, or a path into a
    nested column, is copied, and the source column stays. A path a row lacks gives None (absent), so
    the format's validation names the row.
    """
    uses = [theirs for theirs in column_map.values() if theirs in row]
    renamed = {theirs for theirs in uses if uses.count(theirs) == 1 and theirs not in column_map}
    out = {key: value for key, value in row.items() if key not in renamed}
    for ours, theirs in column_map.items():
        try:
            out[ours] = column_value(row, theirs)
        except MissingColumn:
            out[ours] = None
    return out


def _rename_columns(
    rows: list[dict], columns: list[str], column_map: dict[str, str], source: str
) -> tuple[list[dict], list[str]]:
    """Map THEIR columns (or paths into them) to OUR names, as ``column_map`` (ours -> theirs) says."""
    check_column_map(columns, column_map, source)
    mapped = [map_row(row, column_map) for row in rows]
    return mapped, list(map_row(dict.fromkeys(columns), column_map))


def _check_required(columns: list[str], fmt: DatasetFormat, source: str) -> None:
    """All columns of one of the format's column sets must exist (sft: messages, or prompt + completion;
    preference: prompt + chosen + rejected, or chosen + rejected as whole conversations)."""
    if fmt not in REQUIRED_COLUMNS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {sorted(REQUIRED_COLUMNS)}")
    options = REQUIRED_COLUMNS[fmt]
    missing = [[c for c in option if c not in columns] for option in options]
    if all(missing):
        raise DataValidationError(
            source,
            f"columns {' or '.join(str(list(o)) for o in options)} for format {fmt!r}; "
            f"missing {' or '.join(map(str, missing))}, available {columns} (use column_map to rename)",
        )


def _check_prompt_column(rows: list[dict], columns: list[str], fmt: DatasetFormat, source: str) -> None:
    """Preference rows without a prompt column carry it in whole conversations: text in the first row's
    ``chosen`` means the prompt column is missing (or not mapped), which is said before anything runs."""
    if fmt != "preference" or "prompt" in columns:
        return
    first = next((row["chosen"] for row in rows if row.get("chosen") is not None), None)
    if first is not None and not isinstance(first, list):
        raise DataValidationError(
            source,
            "a 'prompt' column for format 'preference' when 'chosen' holds text (only whole conversations "
            f"in 'chosen' and 'rejected' carry their prompt); available {columns} (use column_map to rename)",
        )


def read_rows(
    source: str,
    *,
    split: str = "train",
    hub_config: str | None = None,
    revision: str | None = None,
    limit: int | None = None,
) -> tuple[list[dict], list[str]]:
    """Rows as the source has them, and its column names: a local ``.jsonl``/``.json``/``.parquet``
    file, a ``save_to_disk`` directory, or else ``datasets.load_dataset(source)``: a Hub dataset name, or
    a local folder holding a dataset repository's files (e.g. ``main/train-*.parquet``, ``train.jsonl``)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = Path(source)
    if path.is_file():
        rows, columns = _read_local_file(path)
        rows = rows[:limit] if limit is not None else rows
    elif path.is_dir() and any((path / name).is_file() for name in _SAVED_DATASET_MARKERS):
        rows, columns = _read_saved_dataset(path, split, limit)
    else:  # a hub name, or a local folder laid out like a hub repository (data files, splits by name)
        rows, columns = _read_hub(source, hub_config, split, revision, limit)
    return rows, columns if columns is not None else _columns_of(rows)


def load_records(
    source: str,
    *,
    fmt: DatasetFormat | None,
    column_map: dict[str, str] | None = None,
    split: str = "train",
    hub_config: str | None = None,
    revision: str | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Rows from :func:`read_rows`, with columns mapped by ``column_map`` (ours -> theirs: a column
    name, or a path into a nested or list column such as ``answers.text[0]``, see
    :mod:`rlhf_core.data.column_paths`). Every other column of the source is kept.

    Checks that the columns required by ``fmt`` exist (and, for preference rows without a prompt column,
    that the first row's ``chosen`` is a conversation); ``fmt=None`` checks only the mapped columns.
    Rows themselves are not validated.
    """
    rows, columns = read_rows(source, split=split, hub_config=hub_config, revision=revision, limit=limit)
    if column_map:
        rows, columns = _rename_columns(rows, columns, column_map, source)
    if fmt is None:
        return rows
    _check_required(columns, fmt, source)
    _check_prompt_column(rows, columns, fmt, source)
    return rows


def _split_sizes(n: int, fractions: list[float]) -> list[int]:
    """Largest-remainder sizes summing to ``n``, each >= 1 when ``n`` allows it."""
    exact = [f * n for f in fractions]
    sizes = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    if n >= len(sizes):
        for i, size in enumerate(sizes):
            if size == 0:  # borrow one row from the largest split
                sizes[max(range(len(sizes)), key=sizes.__getitem__)] -= 1
                sizes[i] = 1
    return sizes


def split_records(records: list[dict], fractions: dict[str, float], seed: int) -> dict[str, list[dict]]:
    """Shuffle with ``random.Random(seed)`` and cut into named splits of the given fractions."""
    if not fractions or any(f <= 0 for f in fractions.values()):
        raise ValueError(f"fractions must be a non-empty mapping of positive numbers, got {fractions}")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {sum(fractions.values())} from {fractions}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    splits, start = {}, 0
    for name, size in zip(fractions, _split_sizes(len(records), list(fractions.values())), strict=True):
        splits[name] = [records[i] for i in order[start : start + size]]
        start += size
    return splits


def _hash_file_into(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def file_digest(path: Path | str) -> str:
    """sha256 hex of a file's bytes."""
    h = hashlib.sha256()
    _hash_file_into(h, Path(path))
    return h.hexdigest()


def directory_digest(path: Path | str) -> str:
    """sha256 hex over every file's relative path and contents, in sorted path order."""
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"directory_digest expects a directory, got {root}")
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(file.relative_to(root).as_posix().encode("utf-8") + b"\0")
        h.update(file_digest(file).encode("ascii") + b"\n")
    return h.hexdigest()
