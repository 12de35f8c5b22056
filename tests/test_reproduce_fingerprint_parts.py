"""Fingerprint parts and the stage-by-stage comparison behind ``rlhf reproduce`` (no MLflow, no Prefect)."""

from __future__ import annotations

import copy

import pytest

from rlhf_core.fingerprint import (
    config_changes,
    describe_part_changes,
    fingerprint_from_parts,
    fingerprint_parts,
    fingerprint_stage,
)
from rlhf_core.refs import DatasetRef, ModelRef
from rlhf_core.spec import parse_spec


def _data_ref(digest: str = "d" * 64) -> DatasetRef:
    return DatasetRef(
        uri="/d", digest=digest, kind="sft", splits={"train": 9}, columns=("messages",), stage="data"
    )


def _model_ref(stage: str, digest: str) -> ModelRef:
    return ModelRef(uri=f"/{stage}", digest=digest, tokenizer_digest="t", stage=stage, base_model="base")


def test_the_fingerprint_is_the_hash_of_its_parts(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": []}\n')
    spec = parse_spec(
        {
            "name": "p",
            "stages": {"data": {"kind": "dataset", "source": {"file": {"path": str(rows), "format": "sft"}}}},
        }
    )
    stage = spec.stages["data"]
    parts = fingerprint_parts("dataset", stage, {}, 7)
    assert fingerprint_from_parts(parts) == fingerprint_stage("dataset", stage, {}, 7)
    assert {"schema", "kind", "config", "code", "seed", "local:source.file.path", "library:torch"} <= set(
        parts
    )
    assert parts["seed"] == "7"
    rows.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    edited = fingerprint_parts("dataset", stage, {}, 7)
    assert describe_part_changes(parts, edited) == [
        f"local file source.file.path changed (digest {parts['local:source.file.path'][:12]} -> "
        f"{edited['local:source.file.path'][:12]})"
    ]
    assert fingerprint_from_parts(edited) != fingerprint_from_parts(parts)


def test_every_kind_of_part_change_reads_as_a_sentence():
    before = {"code": "a" * 64, "config": "c1", "input:model": "m1", "library:torch": "2.5.1", "seed": "0"}
    after = {"code": "b" * 64, "config": "c2", "input:data": "d1", "library:torch": "2.6.0", "seed": "1"}
    assert describe_part_changes(before, after) == [
        "code changed (rlhf_core digest aaaaaaaaaaaa -> bbbbbbbbbbbb)",
        "config changed",
        "input data added",
        "input model removed",
        "library torch 2.5.1 -> 2.6.0",
        "seed 0 -> 1",
    ]
    assert describe_part_changes(before, dict(before)) == []
    base = {"kind": "base_model", "local:path": "w1"}
    assert describe_part_changes(base, {**base, "local:path": "w2"}) == [
        "local model directory path changed (digest w1 -> w2)"
    ]


def test_config_changes_name_each_field():
    before = {"kind": "sft", "train": {"lr": 0.003, "epochs": 1}}
    after = {"kind": "sft", "train": {"lr": 0.001, "epochs": 1, "warmup": 0}}
    assert config_changes(before, after) == [
        "config field train.lr: 0.003 -> 0.001",
        "config field train.warmup added (0)",
    ]


@pytest.fixture
def recorded(tiny_spec_dict):
    """A spec (base -> data -> sft) and the record a pipeline run of it would leave."""
    from flows.stage_calls import base_model_call, stage_call
    from registry.lineage import PipelineRecord, StageRecord, VersionRef

    raw = {**tiny_spec_dict, "stages": {k: tiny_spec_dict["stages"][k] for k in ("data", "sft")}}
    spec = parse_spec(raw)
    outputs = {"base": {"model": _model_ref("base", "b" * 64)}, "data": {"sft": _data_ref()}}
    outputs["sft"] = {"model": _model_ref("sft", "s" * 64)}
    stages = {}
    dumped = spec.model_dump(mode="json")
    for name in ("base", "data", "sft"):
        call = base_model_call(spec, name) if name == "base" else stage_call(spec, name, outputs)
        config = dumped["models"].get(name) or dumped["stages"][name]
        stages[name] = StageRecord(
            name, "r" * 32, call.fingerprint, dict(call.fingerprint_parts), outputs[name], config
        )
    record = PipelineRecord(VersionRef("e2e-sft", "1"), "sft", "1", "p" * 32, copy.deepcopy(dumped), stages)
    return spec, record


def test_an_unchanged_record_matches_stage_by_stage(recorded):
    from cli.reproduce import compare_fingerprints

    spec, record = recorded
    assert [(c.stage, c.status, c.reasons) for c in compare_fingerprints(spec, record)] == [
        ("base", "match", []),
        ("data", "match", []),
        ("sft", "match", []),
    ]


def test_a_config_that_changed_is_named_by_field_and_the_stage_after_it_differs_too(recorded):
    """The record says sft trained with lr 0.001 (an older default, say); today's config says 0.003."""
    from cli.reproduce import compare_fingerprints
    from rlhf_core.fingerprint import fingerprint_from_parts

    spec, record = recorded
    sft = record.stages["sft"]
    sft.config["train"]["lr"] = 0.001
    sft.parts["config"] = "0" * 64
    sft.fingerprint = fingerprint_from_parts(sft.parts)
    checks = {c.stage: c for c in compare_fingerprints(spec, record)}
    assert checks["sft"].status == "differs"
    assert checks["sft"].reasons == ["config field train.lr: 0.001 -> 0.003"]
    assert checks["data"].status == checks["base"].status == "match"


def test_upstream_differences_propagate_and_old_records_say_they_cannot_name_the_part(recorded):
    from cli.reproduce import compare_fingerprints

    spec, record = recorded
    record.stages["data"].fingerprint = "0" * 64
    record.stages["data"].parts = None  # a run recorded before fingerprint parts were
    checks = {c.stage: c for c in compare_fingerprints(spec, record)}
    assert checks["data"].reasons == [
        "fingerprint differs (recorded before fingerprint parts were; no part to name)"
    ]
    assert (checks["sft"].status, checks["sft"].reasons) == (
        "differs",
        ["differs because upstream data differs"],
    )


def test_a_stage_the_pipeline_run_did_not_record_is_reported_as_such(recorded):
    from cli.reproduce import compare_fingerprints

    spec, record = recorded
    del record.stages["data"]
    checks = {c.stage: c for c in compare_fingerprints(spec, record)}
    assert checks["data"].status == "not recorded"
    assert checks["sft"].status == "not recorded"  # its input was never produced
    assert "is not produced yet" in checks["sft"].reasons[0]
