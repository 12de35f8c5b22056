"""The code sandbox: untrusted programs run under bubblewrap with limits, and cannot harm the caller.

Each adversarial program is real and runs for real; the assertions check both what the program saw
(its own output) and what the host sees afterwards (no file written, our processes alive).
"""

from __future__ import annotations

import os
import resource
import secrets
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rlhf_core.errors import UserError
from rlhf_core.rewards.sandbox import SandboxLimits, available_sandbox, run_python

requires_bwrap = pytest.mark.skipif(
    not available_sandbox(), reason="bubblewrap (`bwrap`) is not installed or cannot create namespaces"
)
SHORT = SandboxLimits(wall_seconds=2.0, memory_mb=256, max_processes=16, max_output_bytes=4096)
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@requires_bwrap
def test_runs_a_program_with_its_stdin_and_reports_its_output():
    result = run_python("a, b = map(int, input().split())\nprint(a + b)\n", stdin="3 4\n")
    assert result.sandboxed and result.succeeded
    assert result.stdout == "7\n"


@requires_bwrap
def test_an_endless_loop_is_killed_at_the_wall_clock_limit():
    started = time.monotonic()
    result = run_python("while True:\n    pass\n", limits=SHORT)
    elapsed = time.monotonic() - started
    assert result.timed_out and result.returncode is None
    assert SHORT.wall_seconds <= elapsed < SHORT.wall_seconds + 2.0


@requires_bwrap
def test_a_fork_bomb_stops_at_the_process_limit_and_leaves_nothing_behind():
    bomb = (
        "import os, time\n"
        "children = 0\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"  # children stay: each one holds a slot of the process budget
        "            os._exit(0)\n"
        "        children += 1\n"
        "    except OSError as error:\n"
        "        print('refused after', children, error.errno, flush=True)\n"
        "        break\n"
    )
    result = run_python(bomb, limits=SHORT)
    refused_after = int(result.stdout.split()[2])
    assert 1 <= refused_after < SHORT.max_processes  # EAGAIN at the limit, not the machine's
    assert result.stdout.split()[3] == "11"  # EAGAIN
    # The sleeping children died with the sandbox's pid namespace: none is left running.
    assert _sandboxed_processes() == []


def _sandboxed_processes() -> list[str]:
    """Pids of processes running a sandboxed program (their command line names /program/main.py)."""
    found = subprocess.run(["pgrep", "-f", "/program/main.py"], capture_output=True, text=True)
    return found.stdout.split()


@requires_bwrap
def test_the_leftover_check_sees_a_running_sandbox():
    """The fork-bomb test's check for leftovers would see them: it finds a program still running."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(run_python, "import time\ntime.sleep(1.5)\n", limits=SHORT)
        time.sleep(0.7)
        assert _sandboxed_processes() != []
        running.result()
    assert _sandboxed_processes() == []


@requires_bwrap
def test_writes_outside_the_working_directory_fail_and_leave_no_file():
    name = f"sandbox-escape-{secrets.token_hex(4)}"
    targets = [Path("/tmp") / name, PROJECT_ROOT / name, Path.home() / name, Path("/program") / name]
    program = (
        f"for path in {[str(t) for t in targets]!r} + ['inside.txt']:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('wrote', path)\n"
        "    except OSError as error:\n"
        "        print('refused', path, type(error).__name__)\n"
    )
    result = run_python(program, limits=SHORT)
    for target in targets:
        assert f"refused {target}" in result.stdout
        assert not target.exists()
    assert "wrote inside.txt" in result.stdout  # the working directory is writable


@requires_bwrap
def test_no_network_not_even_the_hosts_loopback():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        program = (
            "import socket\n"
            f"for host in [('127.0.0.1', {port}), ('1.1.1.1', 53)]:\n"
            "    try:\n"
            "        socket.create_connection(host, timeout=1).close()\n"
            "        print('connected', host)\n"
            "    except OSError as error:\n"
            "        print('refused', error.errno)\n"
        )
        result = run_python(program, limits=SHORT)
        assert "connected" not in result.stdout
        assert result.stdout.count("refused") == 2
        with pytest.raises(TimeoutError):
            server.accept()  # nothing reached our server


@requires_bwrap
def test_a_huge_print_is_capped_without_growing_our_memory():
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.monotonic()
    result = run_python("while True:\n    print('x' * 1_000_000)\n", limits=SHORT)
    assert result.output_truncated and result.returncode is None
    assert len(result.stdout) <= SHORT.max_output_bytes
    assert time.monotonic() - started < SHORT.wall_seconds  # killed at the cap, not at the timeout
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_after - peak_before < 50 * 1024


@requires_bwrap
def test_the_program_cannot_signal_the_caller_or_its_processes():
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        program = (
            "import os\n"
            f"for pid in (os.getppid(), {os.getpid()}, {bystander.pid}, -1):\n"
            "    try:\n"
            "        os.kill(pid, 9)\n"
            "    except OSError as error:\n"
            "        print('refused', pid, error.errno, flush=True)\n"
        )
        run_python(program, limits=SHORT)
        assert bystander.poll() is None  # our own child survived kill(-1)
    finally:
        bystander.kill()
        bystander.wait()


@requires_bwrap
def test_a_memory_hog_is_stopped_by_the_address_space_limit():
    result = run_python("hog = bytearray(1024 ** 3)\nprint('allocated')\n", limits=SHORT)
    assert result.returncode != 0
    assert "MemoryError" in result.stderr and "allocated" not in result.stdout


@requires_bwrap
def test_the_environment_is_cleared(monkeypatch):
    monkeypatch.setenv("RLHF_TEST_SECRET", "do-not-leak")
    result = run_python("import os\nprint(sorted(os.environ))\n", limits=SHORT)
    assert "RLHF_TEST_SECRET" not in result.stdout
    assert "HOME" not in result.stdout


def test_without_bubblewrap_it_refuses_and_says_how_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no `bwrap` to find
    available_sandbox.cache_clear()
    try:
        assert not available_sandbox()
        with pytest.raises(UserError, match="apt-get install bubblewrap"):
            run_python("print(1)")
        result = run_python("print(1)", allow_unsandboxed=True, limits=SHORT)
        assert result.stdout == "1\n" and not result.sandboxed
    finally:
        available_sandbox.cache_clear()


def test_unsandboxed_runs_keep_the_limits_timeout_and_output_cap(monkeypatch):
    monkeypatch.setenv("RLHF_TEST_SECRET", "do-not-leak")
    plain = {"limits": SHORT, "sandbox": False}
    result = run_python("import os\nprint(os.getcwd(), sorted(os.environ))\n", **plain)
    assert not result.sandboxed and "RLHF_TEST_SECRET" not in result.stdout
    assert Path(result.stdout.split()[0]).name == "work"  # a fresh directory, removed afterwards
    assert not Path(result.stdout.split()[0]).exists()
    assert run_python("while True:\n    pass\n", **plain).timed_out
    assert "MemoryError" in run_python("hog = bytearray(1024 ** 3)\n", **plain).stderr
    assert run_python("while True:\n    print('x' * 100_000)\n", **plain).output_truncated
