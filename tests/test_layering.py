"""The import direction of ARCHITECTURE.md: rlhf_core is pure, only registry touches MLflow."""

from __future__ import annotations

import ast
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
        ("rlhf_core", {"prefect", "mlflow", "registry", "tasks", "flows"}),
        ("registry", {"prefect", "tasks", "flows"}),
        ("tasks", {"mlflow", "flows"}),
        ("flows", {"mlflow"}),
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
