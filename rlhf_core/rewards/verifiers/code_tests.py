"""The ``code_tests`` verifier: run a completion's code against the row's tests in a sandbox.

Verifiable rewards for code (book ch.7, RLVR): the reward is whether the program the policy wrote
passes the prompt's unit tests. Two test formats, told apart by the tests column's value:

- assertions (MBPP, HumanEval): a list of statements such as ``assert add(1, 2) == 3``, run in the
  namespace the solution defined; with ``entry_point_column`` set, the column holds one HumanEval test
  program defining ``check(candidate)``, called on the function the entry point names;
- stdin/stdout pairs (competitive programming): a list of ``{"input": ..., "output": ...}`` (or
  ``{"inputs": [...], "outputs": [...]}``, or either as a JSON string); the program passes a test when
  it exits with status 0 and its stdout equals the expected output, both stripped of surrounding
  whitespace.

Every program runs under :mod:`rlhf_core.rewards.sandbox`. Assertion tests run in one sandboxed run
per completion, each step (solution, setup, each test) under its own ``timeout_seconds`` alarm; a
test passes only when the harness prints a per-run secret after it, which the program never sees on
its stdin, so a program that exits early with status 0 (``sys.exit(0)``) or prints fake results
scores 0. A program that deliberately digs the secret out of the harness's own stack frames could
still forge it: the sandbox contains what it can do, not what it reports. Stdin/stdout tests run one
sandboxed run per test; after a test times out the completion's remaining tests are not run (they
count as failed) so that an endless loop costs one timeout, not one per test; assertion tests after
one that timed out are skipped alike.

Completions run concurrently, at most ``max_concurrency`` at a time (threads waiting on sandboxed
processes).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rlhf_core.errors import UserError
from rlhf_core.rewards.reward_batch import RewardBatch
from rlhf_core.rewards.sandbox import INSTALL_HINT, SandboxLimits, available_sandbox, run_python

_FENCED_BLOCK = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3"}


class CodeTestsOptions(BaseModel):
    """Options of the ``code_tests`` verifier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code_block: Literal["last", "first", "whole"] = Field(
        "last",
        description="Which code to run: the last (or first) fenced block tagged python, else the last "
        "(or first) fenced block of any kind, else the whole completion; 'whole': the completion as is.",
    )
    tests_column: str = Field("tests", description="Row column holding the tests (asserts or I/O pairs).")
    setup_column: str | None = Field(
        None, description="Row column with code run before the tests (MBPP's `test_setup_code`)."
    )
    entry_point_column: str | None = Field(
        None,
        description="Row column naming the function to test (HumanEval's `entry_point`); when set, the "
        "tests column holds one program defining `check(candidate)`.",
    )
    reward: Literal["fraction", "all_or_nothing"] = Field(
        "all_or_nothing", description="1.0 only when every test passes, or the share of tests passed."
    )
    timeout_seconds: float = Field(5.0, gt=0, le=300, description="Wall-clock limit per test (seconds).")
    memory_mb: int = Field(512, ge=64, le=65536, description="Address-space limit of the program (MiB).")
    max_output_bytes: int = Field(
        64 * 1024, ge=1024, le=64 * 1024 * 1024, description="Stdout + stderr kept per run; beyond, killed."
    )
    max_concurrency: int | None = Field(
        None, ge=1, description="Completions run at once; default: the number of CPUs."
    )
    sandbox: Literal["bubblewrap", "none"] = Field(
        "bubblewrap",
        description="'bubblewrap' isolates each run (see rlhf_core.rewards.sandbox); 'none' runs the "
        "code as a plain subprocess with limits only: it can read and write your files and use the network.",
    )


@dataclass(frozen=True)
class _Tests:
    """One row's tests: assertion statements or (stdin, expected stdout) pairs."""

    asserts: list[str]
    io_pairs: list[tuple[str, str]]
    setup: str

    def __len__(self) -> int:
        return len(self.asserts) + len(self.io_pairs)


@dataclass(frozen=True)
class _Outcome:
    passed: int
    timeouts: int


def code_tests(completions: list[str], rows: list[dict], options: CodeTestsOptions) -> RewardBatch:
    """Score each completion by the tests of its row: 1.0 / 0.0, or the share passed (``reward``).

    metrics: ``tests_passed`` (share of the row's tests passed), ``timeouts`` (tests that ran out of
    time), ``has_code`` (1.0 when a fenced code block was found, or ``code_block: whole``).
    """
    if len(completions) != len(rows):
        raise ValueError(f"{len(completions)} completions for {len(rows)} rows")
    if options.sandbox == "bubblewrap" and not available_sandbox():
        raise UserError(f"code_tests (option `sandbox: bubblewrap`): {INSTALL_HINT}")
    row_tests = [_row_tests(index, row, options) for index, row in enumerate(rows)]
    extracted = [extract_code(completion, options.code_block) for completion in completions]
    codes = [code for code, _ in extracted]
    workers = min(options.max_concurrency or os.cpu_count() or 1, max(1, len(completions)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="code-tests") as pool:
        outcomes = list(pool.map(lambda pair: _run_tests(*pair, options), zip(codes, row_tests, strict=True)))
    shares = [outcome.passed / len(tests) for outcome, tests in zip(outcomes, row_tests, strict=True)]
    all_passed = [1.0 if share == 1.0 else 0.0 for share in shares]
    scores = shares if options.reward == "fraction" else all_passed
    return RewardBatch(
        scores=scores,
        metrics={
            "tests_passed": shares,
            "timeouts": [float(outcome.timeouts) for outcome in outcomes],
            "has_code": [1.0 if fenced else 0.0 for _, fenced in extracted],
        },
    )


def extract_code(completion: str, code_block: str) -> tuple[str | None, bool]:
    """The code to run from a completion (see ``CodeTestsOptions.code_block``), None when empty, and
    whether it came from a fenced block (or ``code_block`` is ``whole``)."""
    if code_block == "whole":
        return (completion if completion.strip() else None), True
    blocks = [(tag.strip().lower(), body) for tag, body in _FENCED_BLOCK.findall(completion)]
    python_blocks = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    candidates = python_blocks or [body for _, body in blocks] or [completion]
    code = candidates[-1] if code_block == "last" else candidates[0]
    return (code if code.strip() else None), bool(blocks)


def _row_tests(index: int, row: dict, options: CodeTestsOptions) -> _Tests:
    tests = _column(index, row, options.tests_column, "tests_column")
    setup = _column(index, row, options.setup_column, "setup_column") if options.setup_column else ""
    where = f"code_tests: row {index}, column '{options.tests_column}'"
    if options.entry_point_column:
        entry_point = _column(index, row, options.entry_point_column, "entry_point_column")
        if not isinstance(tests, str):
            raise UserError(f"{where}: expected a test program defining check(candidate), got {tests!r:.80}")
        return _Tests([f"{tests}\ncheck({entry_point})"], [], setup or "")
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError:
            tests = [tests]  # one block of assertions
    if isinstance(tests, dict) and {"inputs", "outputs"} <= tests.keys():
        if len(tests["inputs"]) != len(tests["outputs"]):
            raise UserError(f"{where}: {len(tests['inputs'])} inputs but {len(tests['outputs'])} outputs")
        pairs = zip(tests["inputs"], tests["outputs"], strict=True)
        tests = [{"input": stdin, "output": stdout} for stdin, stdout in pairs]
    if isinstance(tests, list) and tests and all(isinstance(test, str) for test in tests):
        return _Tests(list(tests), [], setup or "")
    if isinstance(tests, list) and tests and all(_is_io_pair(test) for test in tests):
        return _Tests([], [(str(t["input"]), str(t["output"])) for t in tests], setup or "")
    raise UserError(
        f"{where}: expected a non-empty list of assert statements or of {{input, output}} pairs, "
        f"got {tests!r:.120}"
    )


def _is_io_pair(test: object) -> bool:
    return isinstance(test, dict) and {"input", "output"} <= test.keys()


def _column(index: int, row: dict, column: str, option: str) -> object:
    if column not in row:
        raise UserError(
            f"code_tests: row {index} has no column '{column}' (its columns: {', '.join(map(str, row))}); "
            f"set the option `{option}` to the column that holds it"
        )
    return row[column]


def _run_tests(code: str | None, tests: _Tests, options: CodeTestsOptions) -> _Outcome:
    if code is None:
        return _Outcome(passed=0, timeouts=0)
    if tests.asserts:
        return _run_asserts(code, tests, options)
    return _run_io_pairs(code, tests, options)


def _limits(options: CodeTestsOptions, wall_seconds: float) -> SandboxLimits:
    return SandboxLimits(
        wall_seconds=wall_seconds, memory_mb=options.memory_mb, max_output_bytes=options.max_output_bytes
    )


def _run_io_pairs(code: str, tests: _Tests, options: CodeTestsOptions) -> _Outcome:
    program = f"{tests.setup}\n{code}" if tests.setup else code
    passed = 0
    for stdin, expected in tests.io_pairs:
        result = run_python(
            program,
            stdin=stdin,
            limits=_limits(options, options.timeout_seconds),
            sandbox=options.sandbox == "bubblewrap",
        )
        if result.timed_out:
            return _Outcome(passed=passed, timeouts=1)
        passed += result.succeeded and result.stdout.strip() == expected.strip()
    return _Outcome(passed=passed, timeouts=0)


# The assertion harness: reads the run's secret from stdin, closes stdin, then runs each step under
# an alarm and reports "<secret> <step> <status>" on the original stdout.
_HARNESS = """\
import os, signal, sys
_secret = sys.stdin.buffer.readline().strip().decode()
os.close(0); os.open(os.devnull, os.O_RDONLY); sys.stdin = open(os.devnull)
class _StepTimeout(BaseException):
    pass
def _on_alarm(signum, frame):
    raise _StepTimeout()
signal.signal(signal.SIGALRM, _on_alarm)
def _step(source, namespace):
    signal.setitimer(signal.ITIMER_REAL, {timeout!r})
    try:
        exec(compile(source, "<solution>", "exec"), namespace)
        return "pass"
    except _StepTimeout:
        return "timeout"
    except BaseException:
        return "fail"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
_namespace = {{"__name__": "solution"}}
_ready = _step({code!r}, _namespace)
_ready = _step({setup!r}, _namespace) if _ready == "pass" else _ready
for _index, _test in enumerate({tests!r}):
    _status = _step(_test, _namespace) if _ready == "pass" else _ready
    _ready = "skipped" if _status == "timeout" else _ready  # one endless loop costs one timeout
    sys.__stdout__.write(f"\\n{{_secret}} {{_index}} {{_status}}\\n")
    sys.__stdout__.flush()
"""


def _run_asserts(code: str, tests: _Tests, options: CodeTestsOptions) -> _Outcome:
    secret = secrets.token_hex(16)
    harness = _HARNESS.format(
        timeout=options.timeout_seconds, code=code, setup=tests.setup, tests=tests.asserts
    )
    steps = len(tests.asserts) + 2  # the solution and the setup run under their own alarm too
    result = run_python(
        harness,
        stdin=secret + "\n",
        limits=_limits(options, options.timeout_seconds * steps + 2.0),
        sandbox=options.sandbox == "bubblewrap",
    )
    statuses = dict(line.split()[1:] for line in result.stdout.splitlines() if line.startswith(secret + " "))
    passed = sum(statuses.get(str(index)) == "pass" for index in range(len(tests.asserts)))
    timeouts = sum(statuses.get(str(index)) == "timeout" for index in range(len(tests.asserts)))
    if result.timed_out:
        timeouts += len(tests.asserts) - len(statuses)
    return _Outcome(passed=passed, timeouts=timeouts)
