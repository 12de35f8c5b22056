"""The code_tests verifier on MBPP-style and stdin/stdout rows, honest and adversarial completions.

The rows are written out here in the datasets' own shapes: MBPP (``text``, ``code``, ``test_list``
of asserts, ``test_setup_code``), HumanEval (``test`` defining ``check(candidate)``, ``entry_point``)
and competitive programming (``{input, output}`` pairs).
"""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

import pytest

from rlhf_core.errors import UserError
from rlhf_core.rewards.sandbox import available_sandbox
from rlhf_core.rewards.verifiers.code_tests import CodeTestsOptions, code_tests, extract_code

requires_bwrap = pytest.mark.skipif(
    not available_sandbox(), reason="bubblewrap (`bwrap`) is not installed or cannot create namespaces"
)

REMOVE_OCCURRENCE = {
    "text": "Write a python function to remove first and last occurrence of a given character "
    "from the string.",
    "code": "def remove_Occ(s, ch):\n    s = s.replace(ch, '', 1)\n"
    "    return s[::-1].replace(ch, '', 1)[::-1]\n",
    "test_list": [
        'assert remove_Occ("hello","l") == "heo"',
        'assert remove_Occ("abcda","a") == "bcd"',
        'assert remove_Occ("PHP","P") == "H"',
    ],
    "test_setup_code": "",
}
SHARED_ELEMENTS = {
    "text": "Write a function to find the shared elements from the given two lists.",
    "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
    "test_list": [
        "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
        "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
        "assert set(similar_elements((11, 12, 14, 13),(17, 15, 14, 13))) == set((13, 14))",
    ],
    "test_setup_code": "",
}
HYPOTENUSE = {  # the tests need the setup code's import
    "text": "Write a function to find the length of the hypotenuse of a right triangle.",
    "code": "def hypotenuse(a, b):\n    return (a * a + b * b) ** 0.5\n",
    "test_list": ["assert math.isclose(hypotenuse(3, 4), 5)", "assert math.isclose(hypotenuse(5, 12), 13)"],
    "test_setup_code": "import math",
}
SUM_OF_TWO = {
    "question": "Read two integers on one line and print their sum.",
    "tests": [
        {"input": "3 4\n", "output": "7\n"},
        {"input": "-5 5\n", "output": "0"},
        {"input": "10 20", "output": "30"},
    ],
}
MBPP = CodeTestsOptions(tests_column="test_list", setup_column="test_setup_code", timeout_seconds=2.0)


def fenced(code: str, tag: str = "python") -> str:
    return f"Here is my solution.\n```{tag}\n{code}```\nIt passes the examples."


@requires_bwrap
def test_correct_solutions_score_one_and_wrong_ones_zero():
    rows = [REMOVE_OCCURRENCE, SHARED_ELEMENTS, HYPOTENUSE] * 2
    wrong = ["def remove_Occ(s, ch):\n    return s\n", "def similar_elements(a, b):\n    return ()\n"]
    wrong.append("def hypotenuse(a, b):\n    return a + b\n")
    completions = [fenced(row["code"]) for row in rows[:3]] + [fenced(code) for code in wrong]
    batch = code_tests(completions, rows, MBPP)
    assert batch.scores == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert batch.metrics["has_code"] == [1.0] * 6
    assert batch.metrics["timeouts"] == [0.0] * 6


@requires_bwrap
def test_fraction_gives_the_share_of_tests_passed():
    # Right on "hello" -> "heo" and "abcda" -> "bcd" (two occurrences each), wrong on "PHP": 2 of 3 tests.
    first_and_last_but_case = "def remove_Occ(s, ch):\n    return s.replace(ch, '', 2) if ch != 'P' else s\n"
    options = MBPP.model_copy(update={"reward": "fraction"})
    batch = code_tests([fenced(first_and_last_but_case)], [REMOVE_OCCURRENCE], options)
    assert batch.scores == [pytest.approx(2 / 3)]
    assert code_tests([fenced(first_and_last_but_case)], [REMOVE_OCCURRENCE], MBPP).scores == [0.0]


@requires_bwrap
def test_stdin_stdout_pairs_compare_stripped_output():
    right = "a, b = map(int, input().split())\nprint(a + b)\n"
    off_by_one = "a, b = map(int, input().split())\nprint(a + b + (a < 0))\n"  # wrong on the second test only
    options = CodeTestsOptions(reward="fraction", timeout_seconds=2.0)
    batch = code_tests([fenced(right), fenced(off_by_one)], [SUM_OF_TWO, SUM_OF_TWO], options)
    assert batch.scores == [1.0, pytest.approx(2 / 3)]


@requires_bwrap
def test_humaneval_check_with_an_entry_point():
    row = {
        "prompt": 'def add(x: int, y: int):\n    """Add two numbers x and y."""\n',
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(7, -7) == 0\n",
        "entry_point": "add",
    }
    options = CodeTestsOptions(tests_column="test", entry_point_column="entry_point", timeout_seconds=2.0)
    right, wrong = fenced("def add(x, y):\n    return x + y\n"), fenced("def add(x, y):\n    return x - y\n")
    assert code_tests([right, wrong], [row, row], options).scores == [1.0, 0.0]


def test_which_code_block_is_run():
    completion = "Try:\n```python\nfirst()\n```\nthen\n```\nplain()\n```\nor\n```python\nlast()\n```\n"
    assert extract_code(completion, "last") == ("last()\n", True)
    assert extract_code(completion, "first") == ("first()\n", True)
    assert extract_code("```\nplain()\n```", "last") == ("plain()\n", True)
    assert extract_code("print(1)", "last") == ("print(1)", False)  # no block: the whole completion
    assert extract_code(completion, "whole") == (completion, True)
    assert extract_code("```python\n\n```", "last") == (None, True)


ADVERSARIAL = {
    "endless loop": "def remove_Occ(s, ch):\n    while True:\n        pass\n",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "exit before the tests": "import sys\nsys.exit(0)\n",
    "hard exit": "import os\nos._exit(0)\n",
    "fake results": "for i in range(3):\n    print('\\nPASS', i, 'pass')\n",
    "kill the parent": "import os\nos.kill(os.getppid(), 9)\nos.kill(-1, 9)\n",
    "memory hog": "hog = bytearray(4 * 1024 ** 3)\n",
    "huge print": "while True:\n    print('x' * 1_000_000)\n",
    "network": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n"
    + REMOVE_OCCURRENCE["code"],
}


@requires_bwrap
def test_adversarial_completions_score_zero_and_the_batch_finishes_in_about_a_timeout():
    name = f"escape-{secrets.token_hex(4)}"
    targets = [Path("/tmp") / name, Path(__file__).resolve().parents[1] / name, Path.home() / name]
    writer = "".join(f"open({str(t)!r}, 'w').write('x')\n" for t in targets) + REMOVE_OCCURRENCE["code"]
    programs = {**ADVERSARIAL, "write outside": writer, "honest": REMOVE_OCCURRENCE["code"]}
    options = MBPP.model_copy(update={"timeout_seconds": 1.5, "max_concurrency": 4})
    started = time.monotonic()
    batch = code_tests(
        [fenced(code) for code in programs.values()], [REMOVE_OCCURRENCE] * len(programs), options
    )
    elapsed = time.monotonic() - started
    assert dict(zip(programs, batch.scores, strict=True)) == {name: 0.0 for name in ADVERSARIAL} | {
        "write outside": 0.0,
        "honest": 1.0,
    }
    assert batch.metrics["timeouts"][list(programs).index("endless loop")] == 1.0
    assert not any(target.exists() for target in targets)
    # 11 programs on 4 workers: the slow ones each end at their first timeout (1.5 s), not 3 x 1.5 s.
    assert elapsed < 10.0


@requires_bwrap
def test_works_from_a_worker_thread():
    results = []
    worker = threading.Thread(
        target=lambda: results.append(code_tests([fenced(SHARED_ELEMENTS["code"])], [SHARED_ELEMENTS], MBPP))
    )
    worker.start()
    worker.join(timeout=30)
    assert results[0].scores == [1.0]


def test_sandbox_none_runs_the_same_tests_without_isolation():
    options = MBPP.model_copy(update={"sandbox": "none", "reward": "fraction"})
    completions = [
        fenced(REMOVE_OCCURRENCE["code"]),
        fenced("def remove_Occ(s, ch):\n    return s\n"),
        "no code",
    ]
    batch = code_tests(completions, [REMOVE_OCCURRENCE] * 3, options)
    assert batch.scores == [1.0, 0.0, 0.0]
    assert batch.metrics["has_code"] == [1.0, 1.0, 0.0]
    io_options = CodeTestsOptions(sandbox="none", timeout_seconds=2.0)
    io = code_tests([fenced("print(sum(map(int, input().split())))\n")], [SUM_OF_TWO], io_options)
    assert io.scores == [1.0]


def test_bubblewrap_missing_is_a_user_error_naming_the_option(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    available_sandbox.cache_clear()
    try:
        with pytest.raises(UserError, match=r"sandbox: bubblewrap.*apt-get install bubblewrap"):
            code_tests([fenced("print(1)\n")], [SUM_OF_TWO], CodeTestsOptions())
    finally:
        available_sandbox.cache_clear()


def test_a_row_without_the_tests_column_names_the_row_column_and_option():
    rows = [SUM_OF_TWO, {"question": "q", "answer": "a"}]
    with pytest.raises(UserError) as error:
        code_tests(["x", "y"], rows, CodeTestsOptions(sandbox="none"))
    message = str(error.value)
    assert "row 1" in message and "'tests'" in message and "question, answer" in message
    assert "tests_column" in message


def test_tests_in_an_unknown_shape_are_a_user_error():
    with pytest.raises(UserError, match=r"row 0, column 'tests'.*assert statements or of \{input, output\}"):
        code_tests(["x"], [{"tests": [1, 2]}], CodeTestsOptions(sandbox="none"))
    with pytest.raises(UserError, match="2 inputs but 1 outputs"):
        code_tests(
            ["x"], [{"tests": '{"inputs": ["1", "2"], "outputs": ["1"]}'}], CodeTestsOptions(sandbox="none")
        )


def test_options_reject_unknown_fields_and_bad_ranges():
    with pytest.raises(ValueError):
        CodeTestsOptions(timeout=3)
    with pytest.raises(ValueError):
        CodeTestsOptions(timeout_seconds=0)
    with pytest.raises(ValueError):
        CodeTestsOptions(sandbox="docker")
