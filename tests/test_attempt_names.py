"""A stage resubmitted after a crash says so in the Prefect UI: its dispatch task run and its job."""

from __future__ import annotations

from flows.dispatch import dispatch_run_name
from flows.stage_runner import stage_run_name
from runtime.stage_contract import StageCall


def _call() -> StageCall:
    return StageCall.model_construct(name="sft", kind="sft", fingerprint="abcdef0123456789")


def test_the_first_attempt_keeps_the_plain_names():
    assert dispatch_run_name(_call(), "gpu") == "sft [sft] on gpu"
    parameters = {"ctx": {"pipeline": "demo"}, "call": {"name": "sft", "fingerprint": "abcdef0123456789"}}
    assert stage_run_name(parameters) == "demo-sft-abcdef01"
    assert stage_run_name({**parameters, "attempt": 1}) == "demo-sft-abcdef01"


def test_a_resubmission_names_its_attempt():
    assert dispatch_run_name(_call(), "gpu", 2, 3) == "sft [sft] on gpu (attempt 2 of 3, after a crash)"
    parameters = {"ctx": {"pipeline": "demo"}, "call": {"name": "sft", "fingerprint": "abcdef0123456789"}}
    assert stage_run_name({**parameters, "attempt": 3}) == "demo-sft-abcdef01 (attempt 3)"
