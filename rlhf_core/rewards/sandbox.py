"""Run an untrusted Python program under an OS-level sandbox (bubblewrap) with resource limits.

Code verifiers (``verifiers/code_tests.py``) execute what a policy wrote. ``run_python`` starts the
program under ``bwrap`` with:

- namespaces: no network (a fresh, empty network namespace), a fresh pid namespace (the program sees
  only its own processes and cannot signal ours; everything in it dies with the sandbox), fresh IPC
  and UTS namespaces;
- a minimal read-only filesystem: ``/usr`` and the interpreter's own install (bound at ``/python``),
  the program's files at ``/program``, ``/proc`` and ``/dev/null``. Not mounted: ``/etc``, ``/home``,
  ``/root``, ``/tmp``, the project's checkout, anything of the caller's. The only writable place is
  the working directory ``/sandbox``, a fresh tmpfs capped at ``SandboxLimits.workdir_mb`` (with
  bubblewrap >= 0.7; older ones leave only the per-file size limit);
- an unprivileged uid (no capabilities, ``no_new_privs``), so RLIMIT_NPROC holds and a fork bomb stops
  at ``max_processes``;
- rlimits set by a small wrapper before it execs the program: CPU seconds, address space (memory),
  file size, process count, open files, no core files;
- a wall-clock timeout that kills the whole process group (and with it the sandbox's pid namespace);
- stdout and stderr read incrementally and capped at ``max_output_bytes`` (the run is killed past it);
- an empty environment; the interpreter runs with ``-I -S`` (no site-packages, no user paths).

What it does NOT protect against: kernel exploits (it shares the host kernel; namespaces and rlimits
are not a VM), CPU side channels (Spectre-style attacks on other processes' memory), the program
reading the files it is given read-only (all of ``/usr`` and the interpreter's install, even where
that lives under a home directory, as pyenv's does; ``/proc``'s host-wide files such as ``cpuinfo`` and
``meminfo``), resource use outside rlimits (memory bandwidth, CPU share: a program
can keep a core busy until its timeout; the memory limit holds per process, so a program that forks
can hold up to ``max_processes`` x ``memory_mb``; no cgroup caps the total), and a program that
spends its own run trying to forge the result its harness prints (see ``code_tests``).

When run as root, bwrap does not create a user namespace: inside one, the sandbox uid maps back to
root, whom the kernel exempts from RLIMIT_NPROC. It then keeps only CAP_SETUID/CAP_SETGID for the
wrapper, which switches to a random unprivileged uid (so concurrent sandboxes do not share a process
budget) before it execs the program. As any other user, bwrap runs with ``--unshare-all`` and
``--uid 65534``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_core.errors import UserError

INSTALL_HINT = (
    "the code sandbox needs bubblewrap (`bwrap`): install it with `apt-get install bubblewrap` "
    "(Debian/Ubuntu) or `dnf install bubblewrap` (Fedora); as a non-root user it also needs unprivileged "
    "user namespaces (Ubuntu 24.04 restricts them through AppArmor). Or set `sandbox: none` to run "
    "untrusted code without isolation (not recommended)"
)
_NOBODY = 65534
_ROOT_UID_RANGE = (200_000, 4_000_000)  # uids no account owns; one drawn per run when we are root

# Runs inside the sandbox as the first process: set rlimits, drop to the unprivileged uid when
# started as root, then exec the program. argv: limits (see _wrapper_args), uid, program path.
_WRAPPER = """\
import os, resource, sys
cpu, memory, file_size, processes, uid = (int(a) for a in sys.argv[1:6])
for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory),
                     (resource.RLIMIT_FSIZE, file_size), (resource.RLIMIT_NPROC, processes),
                     (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
if os.getuid() == 0 and uid > 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
os.execv(sys.executable, [sys.executable, "-I", "-S", sys.argv[6]])
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits: wall clock, memory, files, processes, captured output."""

    wall_seconds: float = 10.0  # killed after this long; the CPU limit is this, rounded up, + 1 s
    memory_mb: int = 512  # address space (RLIMIT_AS) of each process
    file_size_mb: int = 16  # largest file the program may write (RLIMIT_FSIZE)
    workdir_mb: int = 64  # size of the writable tmpfs working directory (sandboxed runs only)
    max_processes: int = 8  # RLIMIT_NPROC for the sandbox uid: a fork bomb stops there
    max_output_bytes: int = 64 * 1024  # stdout + stderr kept; the run is killed beyond it


@dataclass(frozen=True)
class RunResult:
    """What one run produced. ``returncode`` is None when the run was killed (timeout, output cap)."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    output_truncated: bool
    sandboxed: bool

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


def run_python(
    source: str,
    *,
    stdin: str = "",
    limits: SandboxLimits = SandboxLimits(),
    allow_unsandboxed: bool = False,
    sandbox: bool = True,
) -> RunResult:
    """Run ``source`` as a Python program, ``stdin`` as its standard input, under ``limits``.

    Sandboxed with bubblewrap when ``available_sandbox()``; otherwise raises ``UserError`` (how to
    install it), unless ``allow_unsandboxed=True``. ``sandbox=False`` (the user's explicit choice)
    skips bubblewrap even where it works. Unsandboxed, it runs as a plain subprocess with the same
    rlimits, timeout, output cap, empty environment and a fresh temporary working directory, but with
    NO isolation: the program can read and write every file the caller can (home, project, /tmp),
    open network connections, signal the caller's processes (``os.kill(os.getppid(), 9)`` kills the
    caller), escape the timeout by starting a new session, and, when the caller is root, fork
    without the process limit. Use it only for code you trust.
    """
    sandboxed = sandbox and available_sandbox()
    if sandbox and not sandboxed and not allow_unsandboxed:
        raise UserError(f"cannot run untrusted code: {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="rlhf-sandbox-") as scratch:
        program_dir, work_dir = Path(scratch, "program"), Path(scratch, "work")
        program_dir.mkdir()
        work_dir.mkdir()
        (program_dir / "limits.py").write_text(_WRAPPER)
        (program_dir / "main.py").write_text(source)
        program_dir.chmod(0o755)  # readable by the sandbox's unprivileged uid
        stdin_path = Path(scratch, "stdin.txt")  # outside /program: the program sees it only as fd 0
        stdin_path.write_bytes(stdin.encode())
        build_command = _bwrap_command if sandboxed else _plain_command
        command = build_command(program_dir, limits)
        with open(stdin_path, "rb") as stdin_file:
            process = subprocess.Popen(
                command,
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=work_dir,
                env={},
                close_fds=True,
                start_new_session=True,  # its own process group, so a kill reaches every process
            )
        stdout, stderr, timed_out, truncated = _collect_output(process, limits)
    return RunResult(
        returncode=None if (timed_out or truncated) else process.returncode,
        stdout=stdout.decode("utf-8", errors="replace"),
        stderr=stderr.decode("utf-8", errors="replace"),
        timed_out=timed_out,
        output_truncated=truncated,
        sandboxed=sandboxed,
    )


@functools.lru_cache(maxsize=1)
def available_sandbox() -> bool:
    """Whether bubblewrap works here: tried once on a trivial program, the answer cached."""
    if shutil.which("bwrap") is None:
        return False
    with tempfile.TemporaryDirectory(prefix="rlhf-sandbox-probe-") as scratch:
        program_dir = Path(scratch)
        program_dir.chmod(0o755)
        (program_dir / "limits.py").write_text(_WRAPPER)
        (program_dir / "main.py").write_text("print('sandbox ok')\n")
        try:
            probe = subprocess.run(
                _bwrap_command(program_dir, SandboxLimits()),
                capture_output=True,
                stdin=subprocess.DEVNULL,
                env={},
                timeout=30,
                start_new_session=True,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
    return probe.returncode == 0 and probe.stdout.strip() == b"sandbox ok"


def _interpreter() -> tuple[Path, str]:
    """The base interpreter's install prefix and its executable's path relative to it (not a venv's:
    the program gets the standard library only)."""
    prefix = Path(sys.base_prefix)
    name = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return prefix, f"bin/{name}"


def _wrapper_args(limits: SandboxLimits, uid: int) -> list[str]:
    cpu_seconds = math.ceil(limits.wall_seconds) + 1
    values = (cpu_seconds, limits.memory_mb << 20, limits.file_size_mb << 20, limits.max_processes)
    return [str(value) for value in (*values, uid)]


def _bwrap_command(program_dir: Path, limits: SandboxLimits) -> list[str]:
    prefix, executable = _interpreter()
    if os.geteuid() == 0:
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
        namespaces += ["--unshare-cgroup-try", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        uid = random.randint(*_ROOT_UID_RANGE)
    else:
        namespaces = ["--unshare-all", "--uid", str(_NOBODY), "--gid", str(_NOBODY)]
        uid = 0  # already unprivileged; the wrapper does not switch
    filesystem = ["--ro-bind", "/usr", "/usr"]
    for link in ("lib", "lib64", "bin", "sbin"):
        if Path("/", link).is_symlink():
            filesystem += ["--symlink", os.readlink(Path("/", link)), f"/{link}"]
    filesystem += ["--ro-bind", str(prefix), "/python", "--ro-bind", str(program_dir), "/program"]
    filesystem += ["--proc", "/proc", "--perms", "0755", "--dir", "/dev"]  # bwrap's default: 0700
    filesystem += ["--dev-bind", "/dev/null", "/dev/null"]
    if _bwrap_supports_size():  # bubblewrap >= 0.7; before, only RLIMIT_FSIZE caps each file
        filesystem += ["--size", str(limits.workdir_mb << 20)]
    filesystem += ["--perms", "1777", "--tmpfs", "/sandbox"]
    return [
        "bwrap",
        *namespaces,
        "--die-with-parent",
        "--new-session",
        *filesystem,
        "--chdir",
        "/sandbox",
        "--clearenv",
        f"/python/{executable}",
        "-I",
        "-S",
        "/program/limits.py",
        *_wrapper_args(limits, uid),
        "/program/main.py",
    ]


@functools.lru_cache(maxsize=1)
def _bwrap_supports_size() -> bool:
    usage = subprocess.run(["bwrap", "--help"], capture_output=True, text=True, timeout=10)
    return "--size" in usage.stdout + usage.stderr


def _plain_command(program_dir: Path, limits: SandboxLimits) -> list[str]:
    prefix, executable = _interpreter()
    wrapper = [str(program_dir / "limits.py"), *_wrapper_args(limits, 0)]
    return [str(prefix / executable), "-I", "-S", *wrapper, str(program_dir / "main.py")]


def _collect_output(process: subprocess.Popen, limits: SandboxLimits) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout and stderr as they come until both close, the deadline passes or the output
    exceeds the cap; then make sure nothing of the run is left. Returns (stdout, stderr, timed_out,
    truncated)."""
    deadline = time.monotonic() + limits.wall_seconds
    captured = {process.stdout: bytearray(), process.stderr: bytearray()}
    timed_out = truncated = False
    with selectors.DefaultSelector() as selector:
        for stream in captured:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map() and not (timed_out or truncated):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(timeout=remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                captured[key.fileobj] += chunk
                if sum(len(text) for text in captured.values()) > limits.max_output_bytes:
                    truncated = True
    if not (timed_out or truncated):
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    _kill_group(process)
    process.stdout.close()
    process.stderr.close()
    stdout, stderr = (bytes(captured[s][: limits.max_output_bytes]) for s in captured)
    return stdout, stderr, timed_out, truncated


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the run's process group (bwrap, and through --die-with-parent its pid namespace)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
