"""N completions per prompt row (book ch.9), as the rows of a completions dataset.

Rows: ``prompt_index``, ``prompt``, ``answer`` (when the prompt has one), ``completion_index``,
``completion`` and ``new_tokens``. Reward sources add ``scores`` and ``reward``
(:func:`rlhf_core.rewards.composite.score_completions`).
"""

from __future__ import annotations

import time

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.rollout.generation import generate
from rlhf_core.spec import SamplingSpec


def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_rows: list[dict],
    n: int,
    cfg: SamplingSpec,
    seed: int,
) -> tuple[list[dict], int, float]:
    """N completions per prompt row; returns (rows without scores, generated tokens, seconds)."""
    started = time.perf_counter()
    out = generate(  # prompt-major: the N samples of prompt i at i*N .. i*N+N-1
        model,
        tokenizer,
        [row["prompt"] for row in prompt_rows],
        samples_per_prompt=n,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        batch_size=cfg.batch_size,
        seed=seed,
        engine=cfg.engine,
    )
    seconds = time.perf_counter() - started
    rows = []
    for flat, (text, length) in enumerate(zip(out.texts, out.new_tokens, strict=True)):
        i, j = divmod(flat, n)
        record = prompt_rows[i]
        row = {
            "prompt_index": i,
            "prompt": record["prompt"],
            "completion_index": j,
            "completion": text,
            "new_tokens": length,
        }
        if "answer" in record:
            row["answer"] = record["answer"]
        rows.append(row)
    return rows, sum(out.new_tokens), seconds
