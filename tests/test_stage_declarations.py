"""A stage kind is one declaration: everything else (inputs, reference checks, fingerprints, dispatch)
is derived from its spec class by generic code. These tests hold that contract for every kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.stage_calls import UpstreamNotReady, base_model_call, check_position_limits, stage_call
from rlhf_core.errors import UserError
from rlhf_core.refs import DatasetRef, EvalReportRef, ModelRef
from rlhf_core.spec import STAGE_KINDS, RefType, load_spec, parse_spec
from rlhf_core.spec.compute import PROFILE_FILE  # recipes/profiles.yaml: compute profiles

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO_ROOT / "recipes").glob("*.yaml") if p.name != PROFILE_FILE)


def fake_ref(ref_type: RefType, name: str, digest: str):
    """A ref of the given type, as a finished upstream stage would return it."""
    if ref_type.output == "model":
        return ModelRef(
            uri=f"/m/{name}",
            digest=digest,
            role=ref_type.kind,
            tokenizer_digest="t",
            stage=name,
            base_model="b",
        )
    if ref_type.output == "dataset":
        return DatasetRef(
            uri=f"/d/{name}", digest=digest, kind=ref_type.kind, splits={"train": 1}, columns=(), stage=name
        )
    return EvalReportRef(stage=name, metrics={"m": {"x": float(len(digest))}}, digest=digest)


def fake_outputs(spec, changed: str | None = None) -> dict:
    """Every stage's and model's outputs as fake refs; ``changed`` ('stage.output') gets another digest."""
    outputs = {
        name: {"model": fake_ref(RefType("model", "policy"), name, f"{name}-d")} for name in spec.models
    }
    for name, stage in spec.stages.items():
        outputs[name] = {
            out: fake_ref(t, name, f"{name}.{out}-d" + ("'" if changed == f"{name}.{out}" else ""))
            for out, t in stage.output_types().items()
        }
    for name in spec.models:
        if changed == f"{name}.model":
            outputs[name]["model"] = fake_ref(RefType("model", "policy"), name, "other")
    return outputs


def test_every_stage_kind_has_a_registered_task():
    from runtime.stage_tasks import task_for_kind

    for kind in STAGE_KINDS:
        assert task_for_kind(kind).name  # a Prefect task named after its function
    with pytest.raises(TypeError, match="no task is registered for stage kind 'nope'"):
        task_for_kind("nope")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_input_of_every_recipe_stage_is_in_its_fingerprint(recipe):
    """Change the digest of one upstream output at a time: exactly the stages that read it change."""
    spec = load_spec(recipe)
    base = {name: stage_call(spec, name, fake_outputs(spec)).fingerprint for name in spec.stages}
    for upstream in [*spec.models, *spec.stages]:
        produced = spec.stages[upstream].output_types() if upstream in spec.stages else {"model": None}
        for output in produced:
            changed = fake_outputs(spec, changed=f"{upstream}.{output}")
            for name, stage in spec.stages.items():
                readers = {ref for ref, _ in stage.input_refs().values()}
                reads = f"{upstream}.{output}" in readers or (upstream in readers and len(produced) == 1)
                after = stage_call(spec, name, changed).fingerprint
                assert (after != base[name]) == reads, (name, upstream, output)


def test_nested_references_are_inputs(tiny_spec_dict):
    """References inside nested settings (reward sources, a judge) are found without a per-kind list."""
    stages = tiny_spec_dict["stages"]
    stages["sample"] = {
        "kind": "sample", "policy": "sft", "prompts": "data.prompts",
        "rewards": [{"function": "arithmetic_exact"}, {"model": "rm", "weight": 0.5}],
    }  # fmt: skip
    stages["label"] = {
        "kind": "label_preferences", "completions": "sample",
        "judge_policy": {"model": "base", "principles": ["be right"]},
    }  # fmt: skip
    spec = parse_spec(tiny_spec_dict)
    assert {p: r for p, (r, _) in spec.stages["sample"].input_refs().items()} == {
        "policy": "sft",
        "prompts": "data.prompts",
        "rewards[1].model": "rm",
    }
    assert {p: r for p, (r, _) in spec.stages["label"].input_refs().items()} == {
        "completions": "sample",
        "judge_policy.model": "base",
    }
    assert spec.dependencies("label") == ["sample", "base"]
    call = stage_call(spec, "sample", fake_outputs(spec))
    assert call.resolve("rm").digest == "rm.model-d"


def test_a_stage_waits_for_unproduced_inputs(tiny_spec_dict):
    spec = parse_spec(tiny_spec_dict)
    outputs = fake_outputs(spec)
    del outputs["sft"]
    with pytest.raises(UpstreamNotReady, match="stage 'rm', field model: 'sft'"):
        stage_call(spec, "rm", outputs)


def test_local_file_content_is_part_of_the_fingerprint(tmp_path, tiny_spec_dict):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    tiny_spec_dict["stages"] = {
        "data": {"kind": "dataset", "source": {"file": {"path": str(rows), "format": "preference"}}}
    }
    spec = parse_spec(tiny_spec_dict)
    before = stage_call(spec, "data", {}).fingerprint
    rows.write_text('{"prompt": "p", "chosen": "a", "rejected": "c"}\n')
    assert stage_call(spec, "data", {}).fingerprint != before
    assert base_model_call(spec, "base").fingerprint == base_model_call(spec, "base").fingerprint


def test_max_length_beyond_a_known_position_limit_fails_before_the_stage(tiny_spec_dict):
    spec = parse_spec(tiny_spec_dict)
    outputs = fake_outputs(spec)
    short = outputs["sft"]["model"].model_copy(update={"max_positions": 32})
    with pytest.raises(UserError, match=r"stage 'rm', field train.max_length: 64 is longer than model 'sft'"):
        check_position_limits("rm", spec.stages["rm"], {"model": short})
