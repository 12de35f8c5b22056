"""Tests for rlhf_core.training.sft.trainer: learning, gradient accumulation, LoRA, and exact resume."""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import rlhf_core.training.sft.trainer as sft
from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.modeling.models import build_tiny_model, save_model
from rlhf_core.modeling.sft_tokens import IGNORE_INDEX, Row, tokenize_conversation
from rlhf_core.spec import LoraSpec, SFTTrainSpec, TinyModelSource
from rlhf_core.training.engine.checkpoint import STATE_FILE
from rlhf_core.training.engine.lora import apply_lora
from rlhf_core.training.sft.trainer import micro_batches_of_step, plan_steps, train_sft

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320)
RECORDS = synthetic_records("arithmetic", "sft", n=32, seed=0)
# Resume runs: 32 examples of 35..40 tokens pack two per 96-token row -> 16 rows; 4 rows per step -> 4 steps
# per epoch, so 8 steps are 2 epochs and resuming at step 3 crosses an epoch boundary on the way.
RESUME_CFG = SFTTrainSpec(max_steps=8, checkpoint_every=3, log_every=1, batch_size=4, lr=3e-3, max_length=96)
K = RESUME_CFG.checkpoint_every


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(TINY, seed=0)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def train(tiny, tmp_path: Path, cfg: SFTTrainSpec, records: list[dict] = RECORDS, **kwargs):
    model, tokenizer = tiny
    return train_sft(
        copy.deepcopy(model), tokenizer, records, cfg, seed=0, checkpoint_dir=tmp_path / "ckpt", **kwargs
    )


# --- learning -------------------------------------------------------------------------------


def test_parameters_change_and_loss_decreases(tiny, tmp_path) -> None:
    model, tokenizer = tiny
    losses: list[float] = []
    cfg = SFTTrainSpec(max_steps=20, lr=3e-3, batch_size=8, max_length=96, log_every=1)
    trained, result = train(tiny, tmp_path, cfg, log=lambda m, step: losses.append(m["train/loss"]))
    assert len(losses) == 20 and result.steps == 20
    # Step 1's loss is measured before any update: a near-uniform random init gives ln(vocab) per token.
    assert losses[0] == pytest.approx(math.log(len(tokenizer)), abs=0.1)  # ln 303 = 5.71
    assert losses[-1] < losses[0] - 0.5
    assert result.final_loss == losses[-1]
    before, after = weights(model), weights(trained)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []


def test_bf16_mixed_precision_tracks_fp32_and_keeps_fp32_weights(tiny, tmp_path) -> None:
    runs = {}
    for precision in ("fp32", "bf16"):
        losses: list[float] = []
        cfg = SFTTrainSpec(
            max_steps=6, lr=3e-3, batch_size=8, max_length=96, log_every=1, precision=precision
        )
        trained, _ = train(
            tiny, tmp_path / precision, cfg, log=lambda m, step, out=losses: out.append(m["train/loss"])
        )
        runs[precision] = (losses, trained)
    fp32, bf16 = runs["fp32"][0], runs["bf16"][0]
    assert all(math.isfinite(x) for x in bf16)
    assert bf16[-1] < bf16[0] - 0.1  # it learns
    assert bf16 == pytest.approx(fp32, abs=0.05)  # bf16 has ~3 significant digits
    assert bf16 != fp32  # autocast really ran in bf16
    assert {p.dtype for p in runs["bf16"][1].parameters()} == {torch.float32}


def test_one_epoch_trains_every_example_once(tiny, tmp_path) -> None:
    _, tokenizer = tiny
    records = RECORDS[:20]
    cfg = SFTTrainSpec(epochs=1, batch_size=4, grad_accum=2, packing=False, max_length=96)
    _, result = train(tiny, tmp_path, cfg, records=records)
    # 20 rows / 4 per micro-batch = 5 micro-batches -> ceil(5 / 2) = 3 optimizer steps.
    assert result.steps == 3 and result.examples == 20
    expected = sum(tokenize_conversation(r["messages"], tokenizer, 96).n_label_tokens for r in records)
    assert result.trained_tokens == expected


def test_every_epoch_visits_every_row_once_in_a_new_order() -> None:
    # 10 rows, 2 per micro-batch, 2 micro-batches per step -> ceil(5 / 2) = 3 steps per epoch, the last
    # one holding the remaining 2 rows.
    cfg = SFTTrainSpec(epochs=2, batch_size=2, grad_accum=2)
    rows = [Row([i], [IGNORE_INDEX], [0]) for i in range(10)]
    per_epoch, total = plan_steps(len(rows), cfg)
    assert (per_epoch, total) == (3, 6)
    plan = sft._Plan(rows, per_epoch, total)
    epochs = [
        [
            row.input_ids[0]
            for step in range(e * 3, e * 3 + 3)
            for micro in micro_batches_of_step(plan, cfg, 0, step)
            for row in micro
        ]
        for e in (0, 1)
    ]
    assert all(sorted(order) == list(range(10)) for order in epochs)
    assert epochs[0] != epochs[1]
    assert [len(m) for m in micro_batches_of_step(plan, cfg, 0, 2)] == [2]


# --- gradient accumulation ------------------------------------------------------------------


def mixed_length_records() -> list[dict]:
    """Short and long answers, so that micro-batches hold very different numbers of trained tokens."""
    return RECORDS[:16] + synthetic_records("arithmetic", "sft", n=16, seed=1, max_operand=10**6)


def test_gradient_accumulation_matches_one_big_batch(tiny, tmp_path) -> None:
    # Each micro-batch's summed token loss is divided by the trained tokens of the whole optimizer step,
    # so sum_i grad(L_i) / N == grad(sum_i L_i) / N: the same gradient as one batch of 8 rows, exactly.
    records = mixed_length_records()
    base = dict(max_steps=3, lr=3e-3, packing=False, max_length=128)
    big, _ = train(tiny, tmp_path / "big", SFTTrainSpec(batch_size=8, grad_accum=1, **base), records)
    accumulated, _ = train(tiny, tmp_path / "acc", SFTTrainSpec(batch_size=4, grad_accum=2, **base), records)
    difference = max_abs_diff(weights(accumulated), weights(big))
    assert difference < 1e-5
    moved = max_abs_diff(weights(big), weights(tiny[0]))
    assert moved > 1e-3  # and the weights did move


def test_gradient_accumulation_check_detects_per_micro_batch_means(tiny, tmp_path, monkeypatch) -> None:
    # Negative control for the test above: emulate the classic bug, mean over each micro-batch's own
    # tokens then average over micro-batches (loss_i = L_i / (n_i * grad_accum)). Same overall scale,
    # different token weighting; the weights then differ from the big batch by far more than 1e-5.
    records = mixed_length_records()
    base = dict(max_steps=3, lr=3e-3, packing=False, max_length=128)
    big, _ = train(tiny, tmp_path / "big", SFTTrainSpec(batch_size=8, grad_accum=1, **base), records)

    label_counts: list[int] = []
    collate, token_loss_sum = sft.collate, sft.token_loss_sum

    def counting_collate(rows, pad_token_id):
        batch = collate(rows, pad_token_id)
        label_counts.append(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
        return batch

    def per_micro_mean(model, batch, packed):
        n_i = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        step_tokens = sum(label_counts[-2:])  # train_sft divides by this afterwards
        return token_loss_sum(model, batch, packed) * step_tokens / (n_i * 2)

    monkeypatch.setattr(sft, "collate", counting_collate)
    monkeypatch.setattr(sft, "token_loss_sum", per_micro_mean)
    buggy, _ = train(tiny, tmp_path / "buggy", SFTTrainSpec(batch_size=4, grad_accum=2, **base), records)
    assert len(set(label_counts)) > 1  # micro-batches really differ in trained tokens
    difference = max_abs_diff(weights(buggy), weights(big))
    assert difference > 1e-4


# --- LoRA -----------------------------------------------------------------------------------


def test_lora_trains_only_adapters_and_returns_a_merged_plain_model(tiny, tmp_path) -> None:
    model, _ = tiny
    lora = LoraSpec(r=4, alpha=8)
    peft_model = apply_lora(copy.deepcopy(model), lora)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    cfg = SFTTrainSpec(max_steps=5, lr=3e-3, batch_size=8, max_length=96)
    merged, _ = train(tiny, tmp_path, cfg, lora=lora)
    assert type(merged) is LlamaForCausalLM
    before, after = weights(model), weights(merged)
    assert after.keys() == before.keys()  # no lora_A / lora_B / base_layer left
    targeted = {k for k in before if any(f".{t}." in k for t in lora.target_modules)}
    assert len(targeted) == 4  # q, k, v, o of the single layer
    for name in before:
        if name in targeted:  # W + (alpha / r) * B @ A merged in
            assert not torch.allclose(after[name], before[name], atol=1e-4), name
        else:  # embeddings, MLP, norms and lm_head were frozen
            assert torch.equal(after[name], before[name]), name
    # The merged model is an ordinary model again: a later stage can train all of it.
    assert all(p.requires_grad for p in merged.parameters())


# --- exact resume ---------------------------------------------------------------------------


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """Reference run: RESUME_CFG trained start to finish; (final weights, {step: logged loss})."""
    logged: dict[int, dict[str, float]] = {}
    trained, result = train(
        tiny,
        tmp_path_factory.mktemp("uninterrupted"),
        RESUME_CFG,
        log=lambda m, step: logged.__setitem__(step, m),
    )
    assert result.resumed_from_step == 0 and sorted(logged) == list(range(1, 9))
    assert logged[4]["train/epoch"] == 1.0  # the 4-steps-per-epoch derivation above RESUME_CFG
    return weights(trained), {step: m["train/loss"] for step, m in logged.items()}


def test_resume_after_an_exception_is_exact(tiny, uninterrupted, tmp_path) -> None:
    reference, reference_losses = uninterrupted
    checkpoint_dir = tmp_path / "ckpt"

    def fail_after_checkpoint(metrics: dict[str, float], step: int) -> None:
        # The loop logs step k, then writes checkpoint k; logging step k+1 is the first moment after it.
        if step == K + 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(tiny, tmp_path, RESUME_CFG, log=fail_after_checkpoint)
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == [f"step-{K}"]

    fresh_model, tokenizer = build_tiny_model(TINY, seed=0)
    logged: list[tuple[int, dict[str, float]]] = []
    resumed, result = train_sft(
        fresh_model,
        tokenizer,
        RECORDS,
        RESUME_CFG,
        seed=0,
        checkpoint_dir=checkpoint_dir,
        log=lambda m, step: logged.append((step, m)),
    )
    assert result.resumed_from_step == K
    assert logged[0] == (K, {"resumed_from_step": float(K)})
    # Steps K+1..8 see the same data, optimizer, and schedule state as the reference: same losses.
    losses = {step: m["train/loss"] for step, m in logged[1:]}
    assert losses == pytest.approx({s: reference_losses[s] for s in range(K + 1, 9)}, abs=1e-6)
    difference = max_abs_diff(weights(resumed), reference)
    assert difference < 1e-5


RESUME_SCRIPT = """
import sys, time
from pathlib import Path

from safetensors.torch import save_file

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.modeling.models import load_model
from rlhf_core.spec import SFTTrainSpec
from rlhf_core.training.sft.trainer import train_sft

mode, model_dir, checkpoint_dir, out = sys.argv[1:5]
cfg = SFTTrainSpec.model_validate_json(sys.argv[5])
model, tokenizer = load_model(model_dir)
records = synthetic_records("arithmetic", "sft", n=32, seed=0)


def block_after_first_checkpoint(metrics, step):
    if step > cfg.checkpoint_every:  # checkpoint k is on disk once step k+1 is logged
        Path(out).write_text(str(step))
        time.sleep(600)  # wait here to be killed


if mode == "interrupt":
    log = block_after_first_checkpoint
else:
    print("ready", flush=True)
    sys.stdin.readline()  # start training only once the interrupted run is dead
    log = None
trained, result = train_sft(model, tokenizer, records, cfg, seed=0, checkpoint_dir=Path(checkpoint_dir),
                            log=log)
save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, out)
print("resumed_from_step", result.resumed_from_step, flush=True)
"""


def _wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"training subprocess exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for the training subprocess:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def test_resume_after_sigkill_is_exact(tiny, uninterrupted, tmp_path) -> None:
    reference, _ = uninterrupted
    model_dir = save_model(*tiny, tmp_path / "base")
    script = tmp_path / "run_sft.py"
    script.write_text(RESUME_SCRIPT)
    checkpoint_dir, marker, final = tmp_path / "ckpt", tmp_path / "blocked", tmp_path / "final.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    args = [str(model_dir), str(checkpoint_dir)]
    logs = [tmp_path / "interrupted.log", tmp_path / "resumed.log"]
    with open(logs[0], "w") as err0, open(logs[1], "w") as err1:
        victim = subprocess.Popen(
            [sys.executable, str(script), "interrupt", *args, str(marker), RESUME_CFG.model_dump_json()],
            cwd=REPO_ROOT,
            env=env,
            stdout=err0,
            stderr=subprocess.STDOUT,
        )
        # The second process imports torch/transformers while the first one trains (saves wall time).
        resumer = subprocess.Popen(
            [sys.executable, str(script), "resume", *args, str(final), RESUME_CFG.model_dump_json()],
            cwd=REPO_ROOT,
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err1,
        )
        try:
            _wait_for(
                lambda: marker.exists() and (checkpoint_dir / f"step-{K}" / STATE_FILE).exists(),
                victim,
                logs[0],
            )
            victim.send_signal(signal.SIGKILL)
            assert victim.wait(timeout=30) == -signal.SIGKILL
            assert sorted(p.name for p in checkpoint_dir.iterdir()) == [f"step-{K}"]
            # Debris of a kill during a later save must be ignored: a half-written temporary directory
            # and a step directory without its trainer state.
            (checkpoint_dir / f".step-{2 * K}.tmp").mkdir()
            (checkpoint_dir / f".step-{2 * K}.tmp" / "model.safetensors").write_bytes(b"\0" * 10)
            (checkpoint_dir / f"step-{2 * K}").mkdir()

            out, _ = resumer.communicate("go\n", timeout=120)
        finally:
            for process in (victim, resumer):
                if process.poll() is None:
                    process.kill()
    assert resumer.returncode == 0, logs[1].read_text()[-3000:]
    assert out.splitlines()[-1] == f"resumed_from_step {K}"
    difference = max_abs_diff(load_file(final), reference)
    assert difference < 1e-5
