"""The optimizer-step loop: extra trainer state is checkpointed with the model and restored on resume."""

from __future__ import annotations

import pytest
import torch

from rlhf_core.spec import OptimSpec
from rlhf_core.training.engine.loop import StepContext, run_optimizer_steps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOTAL_STEPS = 6
CFG = OptimSpec(lr=0.1, warmup_ratio=0.0, checkpoint_every=2, log_every=1, max_grad_norm=None)


class Counter:
    """Toy trainer state (think of a KL controller or a rollout position): advanced by every step."""

    def __init__(self) -> None:
        self.value = 0
        self.seen: list[int] = []

    def state_dict(self) -> dict:
        return {"value": self.value, "seen": list(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.seen = state["value"], list(state["seen"])


class Crash(Exception):
    pass


def _train(checkpoint_dir, counter: Counter, crash_at: int | None = None, ran: list | None = None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.arange(6.0).reshape(2, 3)

    def step_fn(step: int, ctx: StepContext) -> dict[str, float]:
        if step == crash_at:
            raise Crash
        (ran if ran is not None else []).append(step)
        counter.value = 2 * counter.value + step  # depends on the whole history, not on step alone
        counter.seen.append(step)
        loss = (model(x.to(ctx.device)) - counter.value % 5).pow(2).mean()
        ctx.backward(loss)
        return {"loss": loss.item()}

    trained, _ = run_optimizer_steps(
        model, CFG, total_steps=TOTAL_STEPS, steps_per_epoch=TOTAL_STEPS, seed=0,
        checkpoint_dir=checkpoint_dir, step_fn=step_fn, extra_state=[counter],
    )  # fmt: skip
    return trained


def test_extra_state_survives_a_crash_and_resume_exactly(tmp_path):
    uninterrupted = Counter()
    reference = _train(tmp_path / "a", uninterrupted)

    with pytest.raises(Crash):  # dies in step 5, after the checkpoint of step 4
        _train(tmp_path / "b", Counter(), crash_at=5)
    resumed, ran = Counter(), []  # a new process starts from scratch: all it has is the checkpoint
    model = _train(tmp_path / "b", resumed, ran=ran)

    assert ran == [4, 5]  # steps 0-3 were not rerun: their effect on the counter came from the checkpoint
    assert resumed.seen == uninterrupted.seen == list(range(TOTAL_STEPS))
    assert resumed.value == uninterrupted.value
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def _train_two(checkpoint_dir, crash_at: int | None = None, ran: list | None = None):
    """A policy and a value model trained together, as PPO does: one ModuleDict through the loop."""
    torch.manual_seed(0)
    models = torch.nn.ModuleDict({"policy": torch.nn.Linear(3, 2), "value": torch.nn.Linear(3, 1)})
    x = torch.arange(6.0).reshape(2, 3)

    def step_fn(step: int, ctx: StepContext) -> dict[str, float]:
        if step == crash_at:
            raise Crash
        (ran if ran is not None else []).append(step)
        target = float(step % 3)
        loss = (models["policy"](x) - target).pow(2).mean() + (models["value"](x) + target).pow(2).mean()
        ctx.backward(loss)
        return {"loss": loss.item()}

    trained, _ = run_optimizer_steps(
        models, CFG, total_steps=TOTAL_STEPS, steps_per_epoch=TOTAL_STEPS, seed=0,
        checkpoint_dir=checkpoint_dir, step_fn=step_fn,
    )  # fmt: skip
    return trained


def test_two_models_train_and_resume_together(tmp_path):
    reference = _train_two(tmp_path / "a")
    start = torch.nn.ModuleDict({"policy": torch.nn.Linear(3, 2), "value": torch.nn.Linear(3, 1)})
    assert not torch.equal(reference["value"].weight, start["value"].weight)  # both models were trained
    with pytest.raises(Crash):
        _train_two(tmp_path / "b", crash_at=5)
    ran: list[int] = []
    resumed = _train_two(tmp_path / "b", ran=ran)
    assert ran == [4, 5]  # resumed from the checkpoint of step 4, both models restored from it
    for ours, theirs in zip(resumed.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs)
