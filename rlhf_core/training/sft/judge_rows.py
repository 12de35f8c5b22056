"""SFT rows that teach a causal LM to judge pairs: a generative reward model (book ch.5, LLM-as-a-judge).

Each preference row (x, y_c, y_r) becomes the pairwise judge prompt a policy judge is asked
(:func:`rlhf_core.judging.policy_judge.judge_prompt`: the principles, the question, responses A and B)
with the verdict as completion: ``[[A]]`` when y_c is A, ``[[B]]`` when y_c is B. Asked in both orders,
a pair gives both rows, so the judge cannot learn a position preference; the verdict is the last thing
:func:`~rlhf_core.judging.policy_judge.parse_verdict` reads, so the trained judge answers in the form
the ``label_preferences`` and ``evaluate`` stages parse.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from rlhf_core.data.schemas import preference_parts
from rlhf_core.judging.policy_judge import judge_prompt


def question_text(prompt: list[dict]) -> str:
    """The question the judge sees: the last user turn of the prompt (x as chat messages)."""
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return str(users[-1]) if users else "\n".join(str(m["content"]) for m in prompt)


def judge_rows(
    preference_rows: Sequence[dict], principles: Sequence[str], *, both_orders: bool = True, seed: int = 0
) -> list[dict]:
    """``prompt``/``completion`` SFT rows from preference rows of any shape (see the module docstring).

    ``both_orders=False`` gives one row per pair, the chosen response as A or B at random (seeded).
    """
    rng = random.Random(f"{seed}-judge-order")
    rows = []
    for row in preference_rows:
        prompt, chosen, rejected = preference_parts(row)
        question = question_text(prompt)
        orders = (True, False) if both_orders else (rng.random() < 0.5,)
        for chosen_first in orders:
            a, b = (chosen, rejected) if chosen_first else (rejected, chosen)
            verdict = "[[A]]" if chosen_first else "[[B]]"
            rows.append({"prompt": judge_prompt(principles, question, a, b), "completion": verdict})
    return rows
