"""``rlhf --help`` and every command's ``--help`` answer without loading MLflow, Prefect or torch (each
costs seconds to import): the commands import them only when they run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
from typer.testing import CliRunner
from cli.app import app

runner = CliRunner()
helps = [["--help"], ["models", "--help"], ["pools", "--help"]]
helps += [[c, "--help"] for c in ("validate", "plan", "run", "deploy", "schema", "ui", "reproduce")]
helps += [["models", c, "--help"] for c in ("list", "lineage", "promote", "rollback", "history")]
helps += [["pools", c, "--help"] for c in ("create", "template")]
codes = {" ".join(args): runner.invoke(app, args).exit_code for args in helps}
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"mlflow", "prefect", "torch", "transformers"})
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_help_of_every_command_loads_no_heavy_library():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(code == 0 for code in result["codes"].values()), result["codes"]
    assert result["heavy"] == [], result["heavy"]


IMPORT_PROBE = """
import json, sys
import cli.app, cli.console, cli.model_commands, cli.pool_commands, cli.reproduce, cli.ui
loaded = {m.split(".")[0] for m in sys.modules}
heavy = sorted(loaded & {"mlflow", "prefect", "torch", "transformers", "pandas", "sqlalchemy"})
print(json.dumps({"heavy": heavy, "spec": "rlhf_core.spec" in sys.modules}))
"""


def test_command_modules_import_no_heavy_library_nor_the_spec_package():
    """What building the ``rlhf`` app imports at module level: no MLflow, Prefect, torch (nor what they
    pull in), and not the spec package (~0.1 s of pydantic models), which only commands that read a spec
    need; ``rlhf --help`` and ``rlhf models ...`` pay for none of them."""
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], result["heavy"]
    assert result["spec"] is False, "a cli module imports rlhf_core.spec at module level"


def test_a_models_command_gives_the_garbage_collector_back_to_an_in_process_caller():
    """``rlhf models ...`` runs without cyclic GC (see ``cli.model_commands``); a caller in the same
    process (a test, a notebook) has it on again afterwards."""
    import gc

    from typer.testing import CliRunner

    from cli.app import app

    assert gc.isenabled()
    result = CliRunner().invoke(app, ["models", "list", "--help"])
    assert result.exit_code == 0
    assert gc.isenabled()
