"""The git commit a run records: its working tree's, else (a worker running a deployment from a
temporary directory) the version ``rlhf deploy`` gave the deployment."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.code_version import code_commit
from registry.tracking import git_commit

ROOT = Path(__file__).resolve().parents[1]
VERSION_ENV = "PREFECT__RUNTIME__DEPLOYMENT__VERSION"  # Prefect's way to set prefect.runtime values


def test_in_a_git_checkout_the_working_tree_commit_wins(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv(VERSION_ENV, "0123456789abcdef0123456789abcdef01234567")
    assert code_commit() == git_commit(cwd=ROOT) != "unknown"


@pytest.mark.parametrize("version", ["0123456789abcdef0123456789abcdef01234567", "0123abc+dirty"])
def test_outside_git_the_deployment_version_names_the_commit(tmp_path, monkeypatch, version):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(VERSION_ENV, version)
    assert code_commit() == version


@pytest.mark.parametrize("version", [None, "", "3f2a1b9c8d7e6f5a4b3c2d1e0f9a8b7c-flow-hash", "1.0.0"])
def test_a_version_that_is_no_commit_stays_unknown(tmp_path, monkeypatch, version):
    monkeypatch.chdir(tmp_path)
    if version is None:
        monkeypatch.delenv(VERSION_ENV, raising=False)
    else:
        monkeypatch.setenv(VERSION_ENV, version)
    assert code_commit() == "unknown"
