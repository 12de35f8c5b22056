"""A briefly SFT-trained tiny policy, shared by the reward-model and sampling benchmarks.

A randomly initialised model never emits EOS and gives a reward model nothing to build on, so both
benchmarks start from the same tiny Llama after a short SFT on the arithmetic task. The task is the
one of ``recipes/instructgpt_rm.yaml`` (operands up to 20, + and -): on it a 300-step SFT backbone is
strong enough for a reward model to learn which answer is right, so the reward-model benchmark's
held-out accuracy can tell two trainers apart (with all four operations and a 150-step SFT, both
stayed at chance).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

POLICY_TASK = {"max_operand": 20, "operations": ("+", "-")}  # synthetic_records kwargs of every benchmark


def save_sft_policy(directory: Path, steps: int = 300, lr: float = 1e-3, batch_size: int = 16) -> Path:
    """Build the tiny model (seed 0), SFT it on synthetic arithmetic chats, save it under ``directory``."""
    from rlhf_core.data.synthetic import synthetic_records
    from rlhf_core.modeling.models import build_tiny_model, save_model
    from rlhf_core.spec import SFTTrainSpec, TinyModelSource
    from rlhf_core.training.sft.trainer import train_sft

    model, tokenizer = build_tiny_model(
        TinyModelSource(hidden_size=128, layers=2, heads=4, vocab_size=512), seed=0
    )
    cfg = SFTTrainSpec(max_steps=steps, lr=lr, batch_size=batch_size, checkpoint_every=steps, log_every=steps)
    records = synthetic_records("arithmetic", "sft", n=2000, seed=0, **POLICY_TASK)
    with tempfile.TemporaryDirectory() as ckpt:
        model, _ = train_sft(model, tokenizer, records, cfg, seed=0, checkpoint_dir=Path(ckpt))
    return save_model(model, tokenizer, directory / "sft-policy")


def run_with_policy(args, benchmark) -> None:
    """Call ``benchmark(args, policy_dir)`` with ``--policy-dir`` or a freshly built policy in a temp dir."""
    if args.policy_dir:
        benchmark(args, args.policy_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        benchmark(args, save_sft_policy(Path(tmp)))
