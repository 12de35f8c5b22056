"""Direct alignment on a tiny model: every loss trains (loss falls, weights move), DPO starts at ln 2,
reference log-probs are computed once and reused, training resumes exactly, bad settings fail early."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.errors import UserError
from rlhf_core.modeling.models import build_tiny_model, load_model, save_model
from rlhf_core.spec import TinyModelSource
from rlhf_core.spec.stages.direct_alignment import PREFERENCE_LOSSES, DirectAlignmentStage
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training.direct_alignment.trainer import DirectAlignmentInputs, optimize_on_preferences

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    return str(save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model"))


@pytest.fixture(scope="module")
def pairs():
    return synthetic_records("arithmetic", "preference", 48, seed=0, max_operand=9)


def _stage(loss: str, **train) -> DirectAlignmentStage:
    settings = {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0, "max_length": 64, **train}
    return DirectAlignmentStage(
        kind="direct_alignment", policy="p", data="d.preferences", loss=loss, train=settings
    )


def _env(tmp_path, name, log=None):
    """Stage 'dpo' with its checkpoints in ``name``; the reference log-prob cache shared under tmp_path."""
    log = log or (lambda metrics, step: None)
    return StageEnvironment("dpo", 0, tmp_path / name, tmp_path / "cache", tmp_path / name / "ckpt", log=log)


def _inputs(policy_dir, train_rows, eval_rows):
    return DirectAlignmentInputs(
        policy_dir,
        None,
        train_rows,
        eval_rows,
        reference_digest="policy",
        data_digest="pairs",
        data_name="prefs",
    )


def _reference_cache_files(tmp_path):
    return sorted((tmp_path / "cache" / "reference_logprobs").glob("*.pt"))


def _run(policy_dir, pairs, stage, tmp_path, name="run", logged=None):
    log = (lambda metrics, step: logged.append((step, metrics))) if logged is not None else None
    result = optimize_on_preferences(
        stage, _inputs(policy_dir, pairs[:32], pairs[32:]), _env(tmp_path, name, log)
    )
    return result.model, result.tokenizer, result


@pytest.mark.parametrize("loss", sorted(PREFERENCE_LOSSES))
def test_every_loss_trains(loss, policy_dir, pairs, tmp_path):
    logged: list = []
    stage = _stage(loss, log_every=1, max_steps=8, batch_size=8 if loss == "kto" else 4)
    env = _env(tmp_path, "run", log=lambda metrics, step: logged.append(metrics))
    result = optimize_on_preferences(stage, _inputs(policy_dir, pairs[:32], pairs[:32]), env)
    trained = result.model
    losses = [m["train/loss"] for m in logged]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    if loss == "kto":
        # KTO's per-step loss is noisy (each micro-batch has its own mix of labels and its own z_0), so
        # judge it on the training examples themselves, evaluated after training: 0.5 at initialisation
        assert result.heldout["eval/loss"] < 0.5
        assert result.heldout["eval/chosen_reward"] > result.heldout["eval/rejected_reward"]
    else:
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # the loss falls
    start, _ = load_model(policy_dir)
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters(), strict=True)]
    assert all(moved)  # every parameter changed
    assert result.examples == (64 if loss == "kto" else 32)


def test_dpo_starts_at_ln2_and_logs_the_implicit_rewards(policy_dir, pairs, tmp_path):
    logged: list = []
    _run(policy_dir, pairs, _stage("dpo", log_every=1, max_steps=2, lr=1e-9), tmp_path, logged=logged)
    first = logged[0][1]
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert first["train/chosen_reward"] == pytest.approx(0, abs=1e-5)
    assert {"train/accuracy", "train/margin", "train/chosen_logp", "train/rejected_logp"} <= set(first)


def test_reference_logprobs_are_cached_and_reused(policy_dir, pairs, tmp_path):
    first = _run(policy_dir, pairs, _stage("dpo"), tmp_path, name="a")
    assert not first[2].reference_cached and len(_reference_cache_files(tmp_path)) == 2  # train and eval
    second = _run(policy_dir, pairs, _stage("dpo"), tmp_path, name="b")
    assert second[2].reference_cached
    for a, b in zip(first[0].parameters(), second[0].parameters(), strict=True):
        assert torch.equal(a, b)  # same training with the cached reference


def test_reference_free_losses_compute_no_reference(policy_dir, pairs, tmp_path):
    _run(policy_dir, pairs, _stage("simpo"), tmp_path)
    assert not _reference_cache_files(tmp_path)


def test_resume_after_a_crash_ends_where_an_uninterrupted_run_does(policy_dir, pairs, tmp_path, monkeypatch):
    from rlhf_core.training.direct_alignment import trainer as da

    stage = _stage("dpo", max_steps=6, checkpoint_every=2)
    reference, _, _ = _run(policy_dir, pairs, stage, tmp_path, name="whole")
    real = da.step_losses
    calls = {"n": 0}

    def crash_in_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:  # one micro-batch per step: dies in step 5, after the checkpoint of step 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(da, "step_losses", crash_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        _run(policy_dir, pairs, stage, tmp_path, name="crashed")
    monkeypatch.setattr(da, "step_losses", real)
    resumed, _, result = _run(policy_dir, pairs, stage, tmp_path, name="crashed")
    assert result.resumed_from_step == 4
    for a, b in zip(resumed.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_unknown_loss_option_fails_when_the_stage_is_declared():
    """Checked by the spec against the losses' table, before any data or model is loaded."""
    with pytest.raises(ValidationError, match=r"alpha: loss 'dpo' has no such option \(it takes: none\)"):
        DirectAlignmentStage(
            kind="direct_alignment", policy="p", data="d.preferences", loss="dpo", loss_options={"alpha": 1.0}
        )


def test_the_specs_loss_table_is_the_loss_registry():
    """The spec reads the losses' own (torch-free) table; the trainer's functions are built from it."""
    from rlhf_core.losses.direct_alignment import DIRECT_ALIGNMENT_LOSSES
    from rlhf_core.losses.direct_alignment_table import DIRECT_ALIGNMENT_TABLE

    assert PREFERENCE_LOSSES is DIRECT_ALIGNMENT_TABLE
    assert {name: (spec.needs_reference, spec.paired) for name, spec in DIRECT_ALIGNMENT_LOSSES.items()} == {
        name: (loss.needs_reference, loss.paired) for name, loss in PREFERENCE_LOSSES.items()
    }


def test_kto_on_unpaired_data_and_a_single_label_fails(policy_dir, tmp_path):
    rows = synthetic_records("arithmetic", "unpaired_preference", 48, seed=0, max_operand=9)
    assert {r["label"] for r in rows} == {True, False}
    stage = DirectAlignmentStage(
        kind="direct_alignment", policy="p", unpaired_data="d.unpaired_preferences", loss="kto",
        train={"max_steps": 4, "batch_size": 8, "lr": 5e-3, "warmup_ratio": 0.0, "max_length": 64},
    )  # fmt: skip
    trained, _, result = _run(policy_dir, rows, stage, tmp_path)
    assert result.examples == 32 and "eval/kl" in result.heldout
    desirable_only = [r for r in rows if r["label"]]
    with pytest.raises(
        UserError,
        match="every example of stage 'dpo' \\(prefs\\) \\(train split\\) is desirable; kto needs both",
    ):
        _run(policy_dir, desirable_only, stage, tmp_path, name="one-label")


def test_heldout_kl_from_samples_is_zero_for_the_reference_and_grows(policy_dir, pairs, tmp_path):
    from rlhf_core.modeling.models import load_model
    from rlhf_core.modeling.preference_tokens import tokenize_preference_rows
    from rlhf_core.training.direct_alignment.trainer import heldout_kl

    reference, tokenizer = load_model(policy_dir)
    tokens, _ = tokenize_preference_rows(pairs[32:], tokenizer, max_length=64, on_overlong="skip")
    prompts = [t.prompt for t in tokens]
    assert heldout_kl(reference, reference, prompts, tokenizer, 16, seed=0) == pytest.approx(0, abs=1e-9)
    trained, _, result = _run(policy_dir, pairs, _stage("dpo", max_steps=6), tmp_path)
    assert result.heldout["eval/kl_to_reference"] > 0.01  # sampled from the trained policy: it moved away
