"""What a user sees when something goes wrong: one message and an exit status, tracebacks on request.

Exit statuses (``rlhf_core.errors``): 2 for a user error (spec, data, model source, a failed check), its
message alone; 1 for anything else. ``--traceback`` or ``RLHF_TRACEBACK=1`` shows the traceback. Inside
a pipeline run, Prefect logs a failure with its traceback; the console drops it for user errors while
Prefect's API (the run's logs in the UI) keeps it.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.app import app
from cli.console_tracebacks import configure_handler, console_handlers, traceback_shown
from rlhf_core.errors import EXIT_CRASH, EXIT_USER_ERROR, UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _log_failure(exc: Exception, show_user_errors: bool) -> tuple[str, str]:
    """Log ``exc`` as Prefect's engines do; (console text, text of a second, API-like handler)."""
    logger = logging.getLogger(f"test.console_tracebacks.{id(exc)}")
    logger.propagate = False
    console, api = io.StringIO(), io.StringIO()
    console_handler, api_handler = logging.StreamHandler(console), logging.StreamHandler(api)
    for handler in (api_handler, console_handler):
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
    configure_handler(console_handler, show_user_errors)
    try:
        raise exc
    except Exception:
        logger.error("Task run failed with exception: %r", exc, exc_info=True)
    return console.getvalue(), api.getvalue()


def test_console_drops_the_traceback_of_user_errors_only():
    console, api = _log_failure(UserError("row 3: no 'chosen'"), show_user_errors=False)
    assert console == "ERROR Task run failed with exception: UserError(\"row 3: no 'chosen'\")\n"
    assert "Traceback (most recent call last)" in api  # the record itself keeps it

    crash = RuntimeError("a bug")
    console, _ = _log_failure(crash, show_user_errors=False)
    assert "Traceback (most recent call last)" in console and traceback_shown(crash)

    console, _ = _log_failure(UserError("bad row"), show_user_errors=True)
    assert "Traceback (most recent call last)" in console


def test_prefects_console_handler_is_found():
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import APILogHandler, PrefectConsoleHandler

    ensure_logging_setup()
    handlers = console_handlers()
    assert any(isinstance(h, PrefectConsoleHandler) for h in handlers)
    assert not any(isinstance(h, APILogHandler) for h in handlers)


def _bad_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"name": "bad", "stages": {"a": {"kind": "nope"}}}))
    return spec


def test_spec_error_is_one_message_and_exit_status_2(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(_bad_spec(tmp_path))])
    assert result.exit_code == EXIT_USER_ERROR
    assert "invalid pipeline spec" in result.stderr and "stage 'a'" in result.stderr
    assert "Traceback" not in result.output

    shown = CliRunner(env={"RLHF_TRACEBACK": "1"}).invoke(app, ["validate", str(_bad_spec(tmp_path))])
    assert shown.exit_code == EXIT_USER_ERROR
    assert "Traceback (most recent call last)" in shown.stderr


def test_crash_is_exit_status_1_with_a_hint(tmp_path, monkeypatch):
    import cli.app

    def crash(*args, **kwargs):
        raise RuntimeError("a bug in the spec loader")

    monkeypatch.setattr(cli.app, "load_spec", crash)
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "any.yaml")])
    assert result.exit_code == EXIT_CRASH
    assert "RuntimeError: a bug in the spec loader" in result.stderr
    assert "--traceback" in result.stderr and "Traceback" not in result.output

    shown = CliRunner().invoke(app, ["validate", str(tmp_path / "any.yaml"), "--traceback"])
    assert shown.exit_code == EXIT_CRASH
    assert "Traceback (most recent call last)" in shown.stderr


def test_exit_statuses_of_the_cli_itself_pass_through(tmp_path, tiny_spec_dict):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(tiny_spec_dict))
    unknown = CliRunner().invoke(app, ["plan", str(tmp_path / "p.yaml"), "--force", "nosuch"])
    assert unknown.exit_code == EXIT_USER_ERROR and "unknown stage(s) nosuch" in unknown.stderr
    assert CliRunner().invoke(app, ["run"]).exit_code == 2  # usage error: missing spec argument


@pytest.mark.e2e
def test_bad_data_row_in_a_run_prints_one_message_and_no_traceback(tmp_path, prefect_api_url):
    """A data row without ``chosen``, found while the dataset stage runs (validate reads only row 0)."""
    from rlhf_core.data.schemas import DataValidationError

    assert issubclass(DataValidationError, UserError), "data errors must be user errors (rlhf_core/data)"
    rows = ['{"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}'] * 2
    rows.append('{"prompt": "What is 2 + 2?", "rejected": "5"}')
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    spec = {
        "name": "badrow",
        "models": {"base": {"tiny": {"hidden_size": 32, "layers": 1, "heads": 2, "vocab_size": 320}}},
        "stages": {
            "data": {"kind": "dataset", "source": {"file": {"path": "pairs.jsonl", "format": "preference"}}}
        },
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))

    def rlhf_run(**env: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "cli.app", "run", str(tmp_path / "spec.yaml")]
        return subprocess.run(
            [*command, "--home", str(tmp_path / "home")],
            capture_output=True,
            text=True,
            env={**os.environ, "PREFECT_API_URL": prefect_api_url, **env},
            cwd=REPO_ROOT,
            timeout=300,
        )

    quiet = rlhf_run()
    assert quiet.returncode == EXIT_USER_ERROR, quiet.stderr
    assert "pipeline 'badrow' failed: " in quiet.stderr and "row 2" in quiet.stderr
    assert "'chosen'" in quiet.stderr
    assert "Traceback" not in quiet.stdout + quiet.stderr
    assert "Traceback (most recent call last)" in _flow_run_logs(tmp_path / "home", "badrow")

    shown = rlhf_run(RLHF_TRACEBACK="1")
    assert shown.returncode == EXIT_USER_ERROR
    assert "Traceback (most recent call last)" in shown.stderr
    assert shown.stderr.count("Traceback (most recent call last)") == 1  # Prefect's; not printed again


def _flow_run_logs(home: Path, pipeline: str) -> str:
    """Every log message Prefect's API stored for the pipeline's flow run (what the UI shows)."""
    import asyncio

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    uri = f"sqlite:///{home / 'mlflow.db'}"
    mlflow_client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = mlflow_client.get_experiment_by_name(pipeline)
    (parent,) = mlflow_client.search_runs([experiment.experiment_id], "tags.`rlhf.run_type` = 'pipeline'")
    flow_run_id = parent.data.tags["prefect.flow_run_id"]

    async def read() -> list:
        async with get_client() as client:
            return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return "\n".join(log.message for log in asyncio.run(read()))
