"""Scheduling of a pipeline whose stages run on work pools: independent branches on pools run at the
same time, a stage waits for its inputs, in-process stages run one at a time meanwhile.

The stage work itself is replaced (no training, no pools): what is checked is ``flows.pipeline.
run_stages`` — when each stage starts and ends relative to the others — inside a real Prefect flow on
the session's temporary server.
"""

from __future__ import annotations

import threading
import time

import pytest
from prefect import flow, task

from rlhf_core.refs import DatasetRef, ModelRef
from rlhf_core.spec import parse_spec
from runtime.stage_contract import RunContext, StageOutcome

SLEEP = 1.5


def _spec(tiny: dict):
    stages = tiny["stages"]
    sft = stages["sft"]
    spec = {
        **tiny,
        "stages": {
            "data": stages["data"],
            "sft_a": {**sft, "compute": {"pool": "gpu-a"}},  # two branches on two pools ...
            "sft_b": {**sft, "seed": 1, "compute": {"pool": "gpu-b"}},
            "rm": {**stages["rm"], "model": "sft_a"},  # ... one stage after a pool stage, in-process
        },
    }
    return parse_spec(spec)


def _outputs(call) -> dict:
    if call.kind == "dataset":
        common = {
            "uri": "/tmp/x",
            "digest": "d" * 64,
            "splits": {"train": 1},
            "columns": ("c",),
            "stage": call.name,
        }
        kinds = {"sft": "sft", "preferences": "preference", "prompts": "prompts"}
        return {name: DatasetRef(kind=kind, **common) for name, kind in kinds.items()}
    return {
        "model": ModelRef(
            uri="/tmp/m",
            digest=call.fingerprint,
            tokenizer_digest="t",
            stage=call.name,
            base_model="base",
            role="reward" if call.kind == "reward_model" else "policy",
        )  # fmt: skip
    }


@pytest.mark.e2e
def test_branches_on_pools_run_at_the_same_time(tiny_spec_dict, prefect_api_url, monkeypatch):
    import flows.dispatch
    import flows.pipeline

    spans: dict[str, tuple[float, float]] = {}
    lock = threading.Lock()

    rm_started, sft_b_ended = threading.Event(), threading.Event()

    def work(call) -> StageOutcome:
        started = time.monotonic()
        time.sleep(SLEEP)
        # The last dispatched stage ends while the last in-process stage runs (whatever the machine's
        # load): the scheduler must still collect it after that stage (a race found by CI).
        if call.name == "rm":
            rm_started.set()
            assert sft_b_ended.wait(60)
            time.sleep(SLEEP)  # time for sft_b's task run to reach its final state
        if call.name == "sft_b":
            assert rm_started.wait(60)
            sft_b_ended.set()
        with lock:
            spans[call.name] = (started, time.monotonic())
        return StageOutcome(
            stage=call.name, kind=call.kind, status="ran", fingerprint=call.fingerprint, run_id="r",
            outputs=_outputs(call),
        )  # fmt: skip

    @task
    def fake_dispatch(ctx, call, compute, key_prefix):
        assert compute.pool in ("gpu-a", "gpu-b")
        return work(call)

    monkeypatch.setattr(flows.dispatch, "dispatch_stage", fake_dispatch)
    monkeypatch.setattr(flows.pipeline, "task_for_kind", lambda kind: lambda ctx, call: work(call))
    spec = _spec(tiny_spec_dict)
    ctx = RunContext(pipeline="p", experiment_id="0", parent_run_id="parent", home="/tmp/unused")

    @flow
    def schedule() -> list[str]:
        outcomes: list[StageOutcome] = []
        base = ModelRef(uri="/tmp/b", digest="b" * 64, tokenizer_digest="t", stage="base", base_model="base")
        flows.pipeline.run_stages(ctx, spec, {"base": {"model": base}}, outcomes, key_prefix="k")
        return [o.stage for o in outcomes]

    order = schedule()
    assert order == ["data", "sft_a", "sft_b", "rm"]  # reported in DAG order whatever finished first
    (a0, a1), (b0, b1) = spans["sft_a"], spans["sft_b"]
    assert a0 < b1 and b0 < a1, f"the two pool branches did not overlap: {spans}"
    assert spans["sft_a"][0] >= spans["data"][1] and spans["sft_b"][0] >= spans["data"][1]
    assert spans["rm"][0] >= spans["sft_a"][1]  # waits for its input
