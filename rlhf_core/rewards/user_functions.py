"""Reward functions and verifiers named by reference: a file next to the spec or an importable module.

A spec names a scorer with one string (``function:``):

- ``rewards.py:gsm8k_correct``: a Python file (relative to the spec's directory, or absolute) and a
  function in it;
- ``my_pkg.rewards:score``: an importable module and a function in it;
- ``arithmetic_exact``: a built-in, registered by name (:mod:`rlhf_core.rewards.functions`).

A user's function takes the completion and the prompt row (every column of the row, so answers, test
cases or rubrics travel with the data) and returns a float, in one of two shapes:

- per completion: ``fn(completion: str, row: dict, **options) -> float`` (or ``(float, {name: float})``
  to log extra metrics);
- batched: ``fn(completions: list[str], rows: list[dict], **options) -> list[float]`` (or
  ``(list[float], {name: list[float]})``, or a :class:`RewardBatch`). A function is batched when it is
  decorated with :func:`batched` or its first parameter is named ``completions``.

``options`` in the spec are passed as keyword arguments; each must be a parameter of the function (or
the function takes ``**kwargs``). Everything is checked when the spec is read: a missing file or
function, a module that fails to import (its error in one line), a function that is not callable or
takes the wrong parameters, an option it does not take.

The function is part of the stage's fingerprint (:func:`reference_digest`): the file's content and the
modules of its folder it imports (found in the source, :func:`local_helpers`), or the source files of
the module's top-level package. Editing a
reward re-runs exactly the stages that use it and everything downstream.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from rlhf_core.errors import UserError
from rlhf_core.rewards.reward_batch import RewardBatch

BatchScorer = Callable[[list[str], list[dict]], RewardBatch]


def batched(fn: Callable) -> Callable:
    """Mark ``fn(completions, rows, **options)`` as batched (it scores a whole batch in one call)."""
    fn.batched = True  # type: ignore[attr-defined]
    return fn


@dataclass(frozen=True)
class FunctionReference:
    """A parsed ``function:`` value. ``file`` is absolute; ``module`` a dotted name; one of them is set."""

    text: str  # normalised: '/abs/path/rewards.py:fn' or 'pkg.mod:fn'
    attribute: str
    file: Path | None = None
    module: str | None = None

    @property
    def short(self) -> str:
        """How logs and cards name it: ``rewards.py:fn`` or ``pkg.mod:fn``."""
        return f"{self.file.name}:{self.attribute}" if self.file is not None else self.text


def is_reference(text: str) -> bool:
    """A reference (``file.py:fn`` or ``module:fn``), not a registered name."""
    return ":" in text


def parse_reference(text: str, base_dir: str | Path = ".") -> FunctionReference:
    """``rewards.py:fn`` (a relative file is taken from ``base_dir``) or ``pkg.module:fn``."""
    location, sep, attribute = text.rpartition(":")
    if not sep or not location or not attribute.isidentifier():
        raise UserError(
            f"function reference {text!r}: expected 'file.py:function' or 'package.module:function'"
        )
    if location.endswith(".py") or "/" in location or "\\" in location:
        path = Path(location).expanduser()
        path = path if path.is_absolute() else (Path(base_dir) / path)
        path = path.resolve()
        return FunctionReference(text=f"{path}:{attribute}", attribute=attribute, file=path)
    if not all(part.isidentifier() for part in location.split(".")):
        raise UserError(f"function reference {text!r}: {location!r} is not a module name or a .py file")
    return FunctionReference(text=text, attribute=attribute, module=location)


_modules_lock = threading.Lock()
_loaded_files: dict[tuple[Path, str], ModuleType] = {}


def local_helpers(path: Path) -> tuple[Path, ...]:
    """The modules of ``path``'s folder that it imports (``import helpers``, ``from parsing import x``),
    found in its source and theirs, so they are fingerprinted and shipped with it."""
    root, found, todo = path.parent, set(), [path]
    while todo:
        current = todo.pop()
        try:
            tree = ast.parse(current.read_text(), filename=str(current))
        except SyntaxError:
            continue  # reported when the file is imported
        for name in _imported_top_level_names(tree):
            module_file, package = root / f"{name}.py", root / name
            files = [module_file] if module_file.is_file() else []
            if (package / "__init__.py").is_file():
                files = sorted(package.rglob("*.py"))
            for file in files:
                if file != path and file not in found:
                    found.add(file)
                    todo.append(file)
    return tuple(sorted(found))


def _imported_top_level_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _load_file_module(path: Path) -> ModuleType:
    """Import a .py file, once per content of it and its local helpers (an edited helper is imported
    again too); the helpers are imported afresh from its folder (another folder's module of the same
    name is not reused)."""
    if not path.is_file():
        raise UserError(f"Python file {path} (of a function reference) does not exist")
    digest = _files_digest([path, *local_helpers(path)], path.parent)
    with _modules_lock:
        if (path, digest) in _loaded_files:
            return _loaded_files[(path, digest)]
        name = f"rlhf_user_{path.stem}_{digest[:12]}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        for helper in local_helpers(path):
            top = helper.relative_to(path.parent).parts[0].removesuffix(".py")
            for loaded in [m for m in sys.modules if m == top or m.startswith(f"{top}.")]:
                del sys.modules[loaded]
        sys.path.insert(0, str(path.parent))  # its sibling modules import as they would next to it
        try:
            sys.modules[name] = module
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise UserError(f"Python file {path} failed to import: {_one_line(exc)}") from None
        finally:
            sys.path.remove(str(path.parent))
        _loaded_files[(path, digest)] = module
        return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise UserError(f"module {name!r} failed to import: {_one_line(exc)}") from None


def load_function(ref: FunctionReference) -> Callable:
    """The referenced callable; a UserError naming what is missing."""
    module = _load_file_module(ref.file) if ref.file is not None else _import_module(ref.module or "")
    where = ref.file if ref.file is not None else f"module {ref.module}"
    if not hasattr(module, ref.attribute):
        functions = sorted(
            n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")
        )
        raise UserError(
            f"{where} has no function {ref.attribute!r} (functions there: {', '.join(functions) or 'none'})"
        )
    fn = getattr(module, ref.attribute)
    if not callable(fn):
        raise UserError(f"{ref.short} is a {type(fn).__name__}, not a function")
    return fn


def is_batched(fn: Callable) -> bool:
    if getattr(fn, "batched", False):
        return True
    params = list(_signature(fn).parameters)
    return bool(params) and params[0] == "completions"


def check_signature(fn: Callable, name: str, options: dict[str, Any]) -> None:
    """Two positional parameters (completion(s), row(s)) and a keyword parameter per option."""
    signature = _signature(fn)
    params = list(signature.parameters.values())
    positional = [
        p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in options
    ]
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    shape = "(completions, rows, **options)" if is_batched(fn) else "(completion, row, **options)"
    if len(positional) < 2 and not varargs:
        raise UserError(f"reward function {name} takes {signature}; expected {shape}")
    required = [p.name for p in positional[2:] if p.default is p.empty]
    if required:
        raise UserError(
            f"reward function {name}: parameter(s) {', '.join(required)} have no default and no option "
            f"sets them; expected {shape}"
        )
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    unknown = [k for k in options if k not in signature.parameters and not takes_any]
    if unknown:
        takes = [p.name for p in params[2:] if p.kind is not p.VAR_POSITIONAL]
        raise UserError(
            f"reward function {name} takes no option {', '.join(map(repr, unknown))} "
            f"(its options: {', '.join(takes) or 'none'})"
        )


def _signature(fn: Callable) -> inspect.Signature:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot read the parameters of {fn!r}: {exc}") from None


def as_batch_scorer(fn: Callable, name: str, options: dict[str, Any]) -> BatchScorer:
    """``fn`` (either shape) as ``(completions, rows) -> RewardBatch``; wrong counts and types raise."""
    if is_batched(fn):

        def score_batch(completions: list[str], rows: list[dict]) -> RewardBatch:
            return batch_result(fn(completions, rows, **options), len(completions), name)

        return score_batch

    def score_each(completions: list[str], rows: list[dict]) -> RewardBatch:
        scores: list[Any] = []
        extras: list[dict[str, float]] = []
        for completion, row in zip(completions, rows, strict=True):
            value = fn(completion, row, **options)
            extra: dict[str, float] = {}
            if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
                value, extra = value
            scores.append(value)
            extras.append(extra)
        names = sorted({key for extra in extras for key in extra})
        # a metric one row did not give is NaN there (left out of its mean)
        return RewardBatch(scores, {n: [e.get(n, float("nan")) for e in extras] for n in names})

    return score_each


def batch_result(value: Any, count: int, name: str) -> RewardBatch:
    """A batched function's return value as a RewardBatch with ``count`` scores, or a UserError."""
    if isinstance(value, RewardBatch):
        result = value
    elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
        scores, metrics = value
        result = RewardBatch(list(scores), {k: list(v) for k, v in metrics.items()})
    elif isinstance(value, list | tuple) or hasattr(value, "tolist"):
        result = RewardBatch(list(value.tolist() if hasattr(value, "tolist") else value))
    else:
        raise UserError(
            f"reward function {name} returned {type(value).__name__}; a batched function returns a list "
            "of floats, one per completion"
        )
    if len(result.scores) != count:
        raise UserError(
            f"reward function {name} returned {len(result.scores)} scores for {count} completions"
        )
    return result


def reference_digest(ref: FunctionReference) -> str:
    """sha256 of the code a reference runs: the file and the helper files of its folder it imported, or
    every ``.py`` file of the module's top-level package (a lone module: its file)."""
    if ref.file is not None:
        files = [ref.file, *local_helpers(ref.file)]
        root = ref.file.parent
    else:
        module = _import_module(ref.module or "")
        top = _import_module((ref.module or "").split(".")[0])
        top_file = getattr(top, "__file__", None) or getattr(module, "__file__", None)
        if top_file is None:
            raise UserError(f"module {ref.module!r} has no source file to fingerprint")
        top_path = Path(top_file).resolve()
        if top_path.name == "__init__.py":
            root = top_path.parent
            files = sorted(root.rglob("*.py"))
        else:
            root, files = top_path.parent, [top_path]
    return _files_digest(files, root)


def _files_digest(files: list[Path], root: Path) -> str:
    """sha256 over (path relative to ``root``, content) of each file, in the order given."""
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.resolve().relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def code_bundle(reference: str) -> dict[str, str]:
    """The files a file reference runs (relative name -> source), to send with a stage to a worker that
    may not have them; {} for a module reference (the module must be installed where the stage runs)."""
    ref = parse_reference(reference)
    if ref.file is None:
        return {}
    root = ref.file.parent
    return {str(p.relative_to(root)): p.read_text() for p in (ref.file, *local_helpers(ref.file))}


def unpack_bundle(reference: str, files: dict[str, str], cache_dir: Path) -> str:
    """Write a bundle under ``cache_dir/reward-functions/<digest>/`` (unless the referenced file is here
    with the same content) and return the reference to use here; the code, hence its digest, is the same.
    """
    ref = parse_reference(reference)
    assert ref.file is not None
    main = ref.file.name
    if ref.file.is_file() and ref.file.read_text() == files.get(main):
        return reference
    digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "reward-functions" / digest
    for name, text in files.items():
        target = folder / name
        if not target.is_file() or target.read_text() != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")
            partial.write_text(text)
            partial.replace(target)
    return f"{folder / main}:{ref.attribute}"
