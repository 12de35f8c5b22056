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
