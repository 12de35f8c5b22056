"""The import direction of ARCHITECTURE.md: cli -> flows -> tasks -> runtime -> registry and rlhf_core;
rlhf_core is pure, only registry touches MLflow, rlhf_core is a stack of layers (``RLHF_CORE_LAYERS``), and
no shipped package has a file-level import cycle."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_top_levels(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("rlhf_core", {"prefect", "mlflow", "registry", "runtime", "tasks", "flows", "cli"}),
        ("registry", {"prefect", "runtime", "tasks", "flows", "cli"}),
        ("runtime", {"mlflow", "tasks", "flows", "cli"}),
        ("tasks", {"mlflow", "flows", "cli"}),
        ("flows", {"mlflow", "cli"}),
        ("cli", {"mlflow"}),
    ],
)
def test_imports_only_go_down(package, forbidden):
    offenders = {f: sorted(names & forbidden) for f, names in _imported_top_levels(package).items()}
    assert not {f: n for f, n in offenders.items() if n}, offenders


def test_the_cli_module_loads_neither_prefect_nor_mlflow():
    """Prefect reads its settings when imported: the CLI must set the offline defaults (e.g. the
    temporary server's start-up timeout) and PREFECT_HOME first, so no command module may import
    Prefect or MLflow at the top (a top-level import made `rlhf run` time out starting its server)."""
    import subprocess
    import sys

    probe = (
        "import sys, cli.app; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow', 'torch'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --- the import graph of the shipped packages, from their source -----------------------------------------


def _shipped_packages() -> list[str]:
    """The top-level packages pyproject.toml ships (``rlhf_core*`` -> ``rlhf_core``)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [pattern.rstrip("*") for pattern in config["tool"]["setuptools"]["packages"]["find"]["include"]]


def _module_files(packages: list[str]) -> dict[str, Path]:
    """Dotted module name -> file; a package's ``__init__.py`` is named after the package."""
    files = {}
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks (never run, so they close no cycle)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside |= {id(n) for statement in node.body for n in ast.walk(statement)}
    return inside


def _module_imports(
    module: str, path: Path, files: dict[str, Path], *, type_checking: bool
) -> list[tuple[int, str, str]]:
    """(line, import statement, imported module) for each import of ``module`` that names one of
    ``files``, at any depth (inside functions too); ``type_checking``: also those under TYPE_CHECKING."""

    def resolve(name: str) -> str | None:  # the longest prefix of a dotted name that is a module here
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    tree = ast.parse(path.read_text())
    skipped = set() if type_checking else _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [resolve(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [resolve(f"{base}.{alias.name}") or resolve(base) for alias in node.names]
        else:
            continue
        statement = ast.unparse(node)
        found += [(node.lineno, statement, t) for t in dict.fromkeys(targets) if t and t != module]
    return found


# --- the stack inside rlhf_core -------------------------------------------------------------------------

RLHF_CORE_LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # bottom to top; a module may import from its own layer and the layers below it, never above
    ("ground", ("rlhf_core", "rlhf_core.errors", "rlhf_core.refs", "rlhf_core.settings",
                "rlhf_core.locked_initialization", "rlhf_core.stage_environment", "rlhf_core.stage_results",
                "rlhf_core.child_processes")),
    # library code on plain values (tensors, rows, models, numbers): it never sees a spec object
    ("losses: tensors in, tensors out", ("rlhf_core.losses",)),
    ("data: rows, schemas, files", ("rlhf_core.data",)),
    ("modeling: models, tokens, log-probs", ("rlhf_core.modeling",)),
    ("rewards", ("rlhf_core.rewards",)),
    ("environments: tools, multi-turn episodes' other side", ("rlhf_core.environments",)),
    ("rollout", ("rlhf_core.rollout",)),
    ("serving", ("rlhf_core.serving",)),
    ("selection", ("rlhf_core.selection",)),
    # the declarations, then what identifies a stage's result by them
    ("spec", ("rlhf_core.spec",)),
    ("fingerprint", ("rlhf_core.fingerprint",)),
    # stage code: takes spec objects
    ("dataset preparation and judging", ("rlhf_core.dataset_preparation", "rlhf_core.judging")),
    ("evaluation", ("rlhf_core.evaluation",)),
    ("training", ("rlhf_core.training",)),
)  # fmt: skip


def _layer_of(module: str) -> int | None:
    """Index of the layer holding ``module`` (a listed module or anything inside a listed package)."""
    matches = [
        (len(prefix), index)
        for index, (_, prefixes) in enumerate(RLHF_CORE_LAYERS)
        for prefix in prefixes
        if module == prefix or (prefix != "rlhf_core" and module.startswith(prefix + "."))
    ]
    return max(matches)[1] if matches else None


def test_every_rlhf_core_module_has_a_layer():
    files = _module_files(["rlhf_core"])
    unplaced = sorted(m for m in files if _layer_of(m) is None)
    assert not unplaced, f"add these modules to RLHF_CORE_LAYERS (tests/test_layering.py): {unplaced}"


def test_rlhf_core_imports_only_from_its_own_layer_or_below():
    """Every import counts, also inside functions and under TYPE_CHECKING (a type in a signature ties
    the API to the layer that defines it): library code must take plain values, not spec objects."""
    files = _module_files(["rlhf_core"])
    upward = []
    for module, path in sorted(files.items()):
        own = _layer_of(module)
        for line, statement, target in _module_imports(module, path, files, type_checking=True):
            if own is not None and (layer := _layer_of(target)) is not None and layer > own:
                upward.append(
                    f"{path.relative_to(ROOT)}:{line}: `{statement}` ({RLHF_CORE_LAYERS[own][0]}) imports "
                    f"{target} ({RLHF_CORE_LAYERS[layer][0]})"
                )
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


# --- no file-level import cycle in a shipped package -----------------------------------------------------


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:  # node is the root of a component: pop it
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle_and_only_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e", "d"}, "f": {"g"}, "g": {"f"}}
    assert sorted(_cycles(graph)) == [["a", "b", "c"], ["f", "g"]]  # a self-import is no cycle


def test_no_file_level_import_cycle_in_a_shipped_package():
    """Imports inside functions count (they close a cycle at run time); TYPE_CHECKING ones do not."""
    files = _module_files(_shipped_packages())
    graph = {
        module: {target for _, _, target in _module_imports(module, path, files, type_checking=False)}
        for module, path in files.items()
    }
    cycles = _cycles(graph)
    assert not cycles, "import cycles between files:\n" + "\n".join(" <-> ".join(c) for c in cycles)
