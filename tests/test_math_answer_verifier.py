"""math_answer: extraction conventions, math-verify's equivalences, adversarial completions, and the
spawned pool (reused, timed, usable from a worker thread, gone at exit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from rlhf_core.errors import UserError
from rlhf_core.rewards.verifiers.answer_extraction import boxed_contents, extract_final_answer
from rlhf_core.rewards.verifiers.math_answer import POOL_NAME, MathAnswerOptions, math_answer
from rlhf_core.rewards.verifiers.timed_process_pool import TimedProcessPool, shared_pool

ROOT = Path(__file__).resolve().parents[1]

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
     "in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
     "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
     "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
     "$<<0.2*50=10>>10.\n#### 10"},
    {"question": "Janet's ducks lay 16 eggs per day. She eats three and bakes with four. She sells the rest "
     "at $2 per egg. How much does she make every day?",
     "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
     "She makes 9 * 2 = $<<9*2=18>>18.\n#### 18"},
    {"question": "A company pays 250 workers $4 each for a task. How much does it pay in total?",
     "answer": "It pays 250 * 4 = <<250*4=1000>>1000 dollars.\n#### 1,000"},
    {"question": "The temperature was 5 degrees and fell by 5 degrees. What is it now?",
     "answer": "5 - 5 = <<5-5=0>>0.\n#### 0"},
    {"question": "A shirt costs $40 and is discounted by $10. What percent is the discount?",
     "answer": "10 / 40 = 0.25, so the discount is 25%.\n#### 25"},
]  # fmt: skip

MATH_ROWS = [
    {"problem": "What is $\\frac{3}{6}$ in lowest terms?",
     "solution": "Dividing top and bottom by 3 gives $\\boxed{\\frac{1}{2}}$."},
    {"problem": "Evaluate $\\sin 60^\\circ$.", "solution": "It is $\\boxed{\\frac{\\sqrt{3}}{2}}$."},
    {"problem": "Solve $x^2 = 4$ for $x$.", "solution": "So $x = \\pm 2$, i.e. $\\boxed{\\{-2, 2\\}}$."},
    {"problem": "For which $x$ is $1 < x \\le 2$?", "solution": "The set is $\\boxed{(1, 2]}$."},
    {"problem": "Compute $\\frac{2}{8} + \\frac{1}{4}$.",
     "solution": "First $\\frac{2}{8} = \\frac14$, so the sum is $\\boxed{\\dfrac{1}{2}}$."},
    {"problem": "Compute $3^4$.", "solution": "$3^4 = 81$, so the answer is $\\boxed{81}$."},
]  # fmt: skip

DEFAULT = MathAnswerOptions()


def _score(completions, rows, options=DEFAULT):
    return math_answer(completions, rows, options)


def test_gsm8k_rows_accept_every_answer_convention_and_the_usual_notations():
    completions = [
        "She sold 24 in May, so 48 + 24 = 72.\n#### 72",
        "She earns 0.2 per minute, so the answer is $10.",
        "9 eggs times $2 each: \\boxed{\\$18}",
        "250 workers earn $4 each, so it pays 1000 dollars in total.",  # last number, no separator
        "The answer is -0.",
        "The discount is 10/40 = 25%.",  # 25% against 25: equal under percentages='either'
    ]
    result = _score(completions, GSM8K_ROWS)
    assert result.scores == [1.0] * 6
    assert result.metrics["extracted"] == [1.0] * 6
    assert result.metrics["timeouts"] == [0.0] * 6 and result.metrics["parse_errors"] == [0.0] * 6


def test_gsm8k_wrong_answers_score_zero():
    completions = [
        "#### 71",
        "The answer is 12.",
        "\\boxed{19}",
        "It pays 999 dollars.",
        "#### 1",
        "#### 0.25",
    ]
    result = _score(completions, GSM8K_ROWS, MathAnswerOptions(percentages="number"))
    assert result.scores == [0.0] * 6
    assert result.metrics["extracted"] == [1.0] * 6


@pytest.mark.parametrize(
    ("completion", "row", "expected"),
    [
        ("\\boxed{0.5}", 0, 1.0),
        ("The answer is 1/2.", 0, 1.0),
        ("\\boxed{\\frac12}", 0, 1.0),
        ("\\boxed{\\dfrac{2}{4}}", 0, 1.0),
        ("\\boxed{0.6}", 0, 0.0),
        ("\\boxed{\\sqrt{3}/2}", 1, 1.0),
        ("\\boxed{\\{2, -2\\}}", 2, 1.0),
        ("\\boxed{\\{2\\}}", 2, 0.0),
        ("\\boxed{(1,2]}", 3, 1.0),
        ("\\boxed{[1,2]}", 3, 0.0),
        ("\\boxed{0.5}", 4, 1.0),
        ("so $3^4 = \\boxed{81}$", 5, 1.0),
    ],
)
def test_math_rows_compare_by_value(completion, row, expected):
    assert _score([completion], [MATH_ROWS[row]], MathAnswerOptions(answer_column="solution")).scores == [
        expected
    ]


@pytest.mark.parametrize(
    ("percentages", "completion", "expected"),
    [("either", "50", 1.0), ("either", "0.5", 1.0), ("number", "50", 1.0), ("number", "0.5", 0.0),
     ("fraction", "0.5", 1.0), ("fraction", "50", 0.0)],
)  # fmt: skip
def test_percentages_follow_the_option(percentages, completion, expected):
    result = _score(
        [f"\\boxed{{{completion}}}"], [{"answer": "50%"}], MathAnswerOptions(percentages=percentages)
    )
    assert result.scores == [expected]


def test_only_the_last_boxed_answer_counts_and_listing_guesses_can_be_refused():
    listing = "Maybe \\boxed{1}, or \\boxed{2}, or \\boxed{3}."
    row_three, row_one = {"answer": "3"}, {"answer": "1"}
    assert _score([listing, listing], [row_three, row_one]).scores == [1.0, 0.0]
    strict = MathAnswerOptions(several_boxed="zero")
    result = _score([listing, "\\boxed{3} so again \\boxed{ 3 }"], [row_three, row_three], strict)
    assert result.scores == [0.0, 1.0]
    assert result.metrics["extracted"] == [1.0, 1.0]
    # one box holding all guesses is a set, which does not equal the single reference
    assert _score(["\\boxed{1, 2, 3}"], [row_three]).scores == [0.0]


def test_extraction_order_and_strictness():
    row = {"answer": "#### 7"}
    text = "The answer is 7. Check: 3 + 5 = 8"
    assert _score([text], [row]).scores == [1.0]
    last_first = MathAnswerOptions(extraction=("last_number", "answer_is"))
    assert _score([text], [row], last_first).scores == [0.0]
    strict = MathAnswerOptions(fallback_to_last_number=False)
    result = _score(["3 + 4 = 7", "3 + 4 = 7"], [row, row], strict)
    assert result.scores == [0.0, 0.0] and result.metrics["extracted"] == [0.0, 0.0]
    assert extract_final_answer("x \\boxed{\\frac{1}{2}} y", ["boxed"]) == ("boxed", "\\frac{1}{2}")
    assert boxed_contents("\\boxed{a{b}c} \\boxed{d") == ["a{b}c"]  # the unclosed box is ignored


def test_options_are_validated():
    with pytest.raises(ValidationError, match="distinct"):
        MathAnswerOptions(extraction=("boxed", "boxed"))
    with pytest.raises(ValidationError):
        MathAnswerOptions(extraction=("boxed", "first_line"))
    with pytest.raises(ValidationError):
        MathAnswerOptions(answer_colum="answer")


def test_a_missing_column_or_reference_names_the_row_the_column_and_the_option():
    rows = [GSM8K_ROWS[0], {"question": "no answer here"}]
    with pytest.raises(
        UserError, match=r"row 1 has no column 'answer' \(its columns: \['question'\]\).*answer_column"
    ):
        _score(["#### 72", "#### 72"], rows)
    with pytest.raises(UserError, match=r"row 0, column 'answer'.*'#### <answer>'.*answer_format='gsm8k'"):
        _score(["#### 72"], [{"answer": "72"}], MathAnswerOptions(answer_format="gsm8k"))


def test_adversarial_completions_score_zero_without_stalling_the_batch():
    options = MathAnswerOptions(timeout_seconds=1.0)
    rows = [{"answer": "#### 72"}] * 5
    completions = [
        "\\boxed{" + "9" * 200_000 + "}",  # enormous number: longer than max_answer_chars, not parsed
        "\\boxed{" + "{" * 5000 + "72" + "}" * 5000 + "}",  # deeply nested braces
        "\\boxed{10^{10^{10}}}",  # sympy would compute a 10-billion-digit integer: timed out
        "\\boxed{" * 20_000,  # thousands of unclosed boxes: extraction stays linear
        "#### 72",
    ]
    started = time.monotonic()
    result = _score(completions, rows, options)
    elapsed = time.monotonic() - started
    assert result.scores[0] == 0.0 and result.metrics["parse_errors"][0] == 1.0
    assert result.scores[1] in (0.0, 1.0)  # math-verify may read {{72}} as 72; what matters is it returns
    assert result.scores[2] == 0.0 and result.metrics["timeouts"][2] == 1.0
    assert result.scores[3] == 0.0
    assert result.scores[4] == 1.0
    assert elapsed < 15.0, elapsed  # one timeout (1 s) plus the pool's start, not a hang


def test_the_pool_is_started_once_and_reused_across_batches():
    _score(["#### 72"], [GSM8K_ROWS[0]])
    pool = shared_pool(POOL_NAME)
    started = pool.started_workers
    for _ in range(3):
        assert _score(["#### 72", "#### 10"], GSM8K_ROWS[:2]).scores == [1.0, 1.0]
    assert shared_pool(POOL_NAME) is pool and pool.started_workers == started


def test_scoring_from_a_worker_thread():
    results = {}

    def score_rows_in_thread():
        rows = [{"answer": "\\boxed{\\frac{1}{2}}"}, GSM8K_ROWS[0]]
        results["batch"] = _score(["\\boxed{0.5}", "#### 71"], rows)

    thread = threading.Thread(target=score_rows_in_thread)
    thread.start()
    thread.join(timeout=120)
    assert results["batch"].scores == [1.0, 0.0]


def test_a_task_stuck_where_the_timer_cannot_reach_gets_its_worker_replaced():
    """The worker's timer works by a signal handler; a task that blocks SIGALRM (as a C routine that
    never returns to the interpreter would, in effect) must be ended by the parent's backstop."""
    pool = TimedProcessPool(workers=1)
    try:
        block = (signal.SIG_BLOCK, {signal.SIGALRM})
        outcomes = pool.map(signal.pthread_sigmask, [block], timeout_s=1.0)
        assert outcomes[0].status == "ok"
        started = time.monotonic()
        outcomes = pool.map(time.sleep, [(30,)], timeout_s=0.5, grace_s=0.5)
        assert outcomes[0].status == "timeout"
        assert time.monotonic() - started < 10.0
        assert pool.started_workers == 2  # the stuck worker was killed and replaced
        assert [o.status for o in pool.map(abs, [(-3,)], timeout_s=1.0)] == ["ok"]
        assert [o.status for o in pool.map(int, [("x",)], timeout_s=1.0)] == ["error"]
    finally:
        pool.close()


def test_workers_are_gone_after_the_interpreter_exits_even_after_torch():
    program = (
        "import torch, multiprocessing\n"
        "torch.set_num_threads(2); torch.ones(64, 64) @ torch.ones(64, 64)\n"
        "from rlhf_core.rewards.verifiers.math_answer import math_answer, MathAnswerOptions\n"
        "batch = math_answer(['#### 72'], [{'answer': '72'}], MathAnswerOptions())\n"
        "print(batch.scores, [p.pid for p in multiprocessing.active_children()])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    scores, pids = done.stdout.strip().split("] [")
    assert scores == "[1.0"
    worker_pids = [int(pid) for pid in pids.rstrip("]").split(",")]
    assert worker_pids
    time.sleep(0.5)
    assert not [pid for pid in worker_pids if Path(f"/proc/{pid}").exists()]
