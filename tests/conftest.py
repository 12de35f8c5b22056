"""Shared fixtures. The offline/telemetry environment is set before anything imports Prefect."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest

from rlhf_core.settings import OFFLINE_DEFAULTS

for _key, _value in OFFLINE_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
# Prefect's own state for the test session lives in a throwaway dir, never in ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="rlhf-test-prefect-"))

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_SPEC: dict = {
    "name": "e2e",
    "seed": 0,
    "models": {"base": {"tiny": {"hidden_size": 32, "layers": 1, "heads": 2, "vocab_size": 320}}},
    "stages": {
        "data": {"kind": "dataset", "source": {"synthetic": {"n": 200, "max_operand": 9}}},
        "sft": {
            "kind": "sft",
            "model": "base",
            "data": "data.sft",
            "train": {
                "max_steps": 12,
                "batch_size": 8,
                "lr": 3e-3,
                "max_length": 64,
                "checkpoint_every": 4,
                "log_every": 4,
            },
        },
        "rm": {
            "kind": "reward_model",
            "model": "sft",
            "data": "data.preferences",
            "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-3, "max_length": 64},
        },
        "eval": {
            "kind": "evaluate",
            "models": ["base", "sft"],
            "data": "data.sft",
            "prompts": "data.prompts",
            "max_prompts": 12,
            "samples_in_table": 4,
            "generation": {"max_new_tokens": 8},
        },
    },
}


@pytest.fixture
def tiny_spec_dict() -> dict:
    """A whole pipeline small enough to run in seconds (fresh deep copy per test)."""
    return copy.deepcopy(TINY_SPEC)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads waiting
    on each other make these tests ~30x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prefect_api_url() -> str:
    """One temporary Prefect server (SQLite) for the whole session; its API URL for subprocesses."""
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield prefect.settings.PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def real_prefect_server(tmp_path_factory):
    """One real ``prefect server start`` for the session (``prefect_servers.prefect_server``), for the
    modules that need what only a real server runs: the repossessor of expired leases, a restart on the
    same port and database. Its start (database migrations) costs 15-55 s on a 2-core machine, once.

    Expired leases are looked for every second (default 15 s), and a waiter on a concurrency slot is
    told to ask again within a second (default up to 30 s). A test that stops the server starts it again
    (``ensure_running()`` does, should that test have failed while it was down)."""
    from prefect_servers import prefect_server

    fast = {
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1",
        "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
    }
    with prefect_server(tmp_path_factory.mktemp("prefect-server"), env=fast) as server:
        print(f"prefect server ready in {server.startup_seconds:.1f} s")
        yield server


def pytest_collection_modifyitems(config, items):
    """End-to-end modules first, each module's tests kept together and in order.

    ``make test`` runs the suite on two pytest-xdist workers, one module at a time per worker
    (``--dist loadfile``), handing out modules in collection order. The e2e modules take 20-190 s
    each and the unit modules a few seconds, so starting with the long ones lets the short ones fill
    the end and both workers finish close together (the longest-first rule of list scheduling)."""

    def module(item) -> str:
        return item.nodeid.split("::")[0]

    first_seen: dict[str, int] = {}
    e2e_modules: set[str] = set()
    for i, item in enumerate(items):
        first_seen.setdefault(module(item), i)
        if item.get_closest_marker("e2e") is not None:
            e2e_modules.add(module(item))
    # a stable sort: within a module the tests keep their order
    items.sort(key=lambda item: (module(item) not in e2e_modules, first_seen[module(item)]))
